"""kvgate's root command; the packages below it (bench, batch, gateway, engine) hold everything else."""
