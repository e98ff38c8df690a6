"""`kvgate batch merge`: shard K of N holds input lines K-1, K-1+N, K-1+2N, ... in order, so the merged file
takes one line from each shard in turn."""

from __future__ import annotations

import os
from contextlib import ExitStack


def merge_shards(paths: list[str], output: str) -> int:
    """Interleave shard outputs (given as 1/N ... N/N) into output; returns the number of lines."""
    tmp = output + ".partial"
    try:
        count = _interleave(paths, tmp)
    except BaseException:
        if os.path.exists(tmp):  # a refused merge leaves nothing behind
            os.unlink(tmp)
        raise
    os.replace(tmp, output)
    return count


def _interleave(paths: list[str], tmp: str) -> int:
    count = 0
    with ExitStack() as stack:
        files = [stack.enter_context(open(p, "rb")) for p in paths]
        out = stack.enter_context(open(tmp, "wb"))
        exhausted_at = None
        while True:
            for k, f in enumerate(files):
                line = f.readline()
                if not line:
                    exhausted_at = k
                    break
                if not line.endswith(b"\n"):
                    raise ValueError(f"{paths[k]} ends in a cut line: finish that shard (--resume) first")
                out.write(line)
                count += 1
            if exhausted_at is not None:
                break
        # Shards may differ by one line, and only the later ones may be shorter.
        leftovers = [paths[k] for k in range(len(files)) if files[k].readline()]
        if leftovers:
            raise ValueError(f"the shards do not fit together: {', '.join(leftovers)} have more lines than the "
                             "shards before them; give the shard outputs in order 1/N ... N/N, each complete")
    return count
