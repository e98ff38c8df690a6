"""HTTP handlers: thin. Each reads its body itself (so every malformed body gets a precise 400), asks the
service for the work, and watches for the client leaving (its request is then aborted in the engine)."""

from __future__ import annotations

import asyncio

import msgspec
import orjson
from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.exceptions import InternalServerException
from litestar.response import Stream

from gateway.errors import APIError, bad_request, from_exception
from gateway.metrics import CONTENT_TYPE
from gateway.params import chat_messages
from gateway.schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from gateway.serving import VERSION
from gateway.state import Gateway

_DECODERS = {t: msgspec.json.Decoder(t) for t in (ChatCompletionRequest, CompletionRequest, TokenizeRequest,
                                                  DetokenizeRequest)}
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def json_response(body: dict, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


async def _read(request: Request, gateway: Gateway, struct: type):
    try:
        body = await asyncio.wait_for(request.body(), gateway.config.body_timeout_s)
    except asyncio.TimeoutError:
        # and close: left open, the connection would go on reading the rest of the body at the client's pace
        raise APIError(408, "The request body was not received in time.", code="timeout",
                       headers={"Connection": "close"}) from None
    except InternalServerException:  # Litestar's "client disconnected prematurely": not a server error
        raise ClientDisconnected() from None
    try:
        req = _DECODERS[struct].decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise from_exception(exc) from None
    except RecursionError:  # msgspec's answer to arrays or objects nested thousands deep
        raise bad_request("The request body is nested too deeply.", code="invalid_json") from None
    gateway.metrics.unknown_fields.check(body, struct, request.scope["path"])
    return req


async def _generate(request: Request, gateway: Gateway, struct: type, make_job: str) -> Response:
    if not gateway.ready and not gateway.restarting:
        raise gateway.unavailable()  # loading, or dead for good: at once
    ticket = gateway.admit()
    try:
        try:
            req = await _read(request, gateway, struct)
            service = await _service(request, gateway)
        except ClientDisconnected:  # gone before its body was read, or while it waited for the engine
            gateway.metrics.on_request_aborted("client_disconnect")
            raise
        except APIError as exc:
            if exc.status == 408:  # its body came too slowly
                gateway.metrics.on_request_aborted("timeout")
            raise
        job = getattr(service, make_job)(req)
        if job.stream:
            events = _released_after(service.stream(job), ticket)
            ticket.release_with(events)
            ticket = None  # the stream owns it now
            return Stream(events, media_type="text/event-stream", headers=_SSE_HEADERS)
        body = await _unless_client_leaves(request, service.respond(job))
        return json_response(body)
    finally:
        if ticket is not None:
            ticket.release()


async def _service(request: Request, gateway: Gateway):
    """The service; while a dead engine is restarted, waiting for it (holding the request's admission slot)."""
    if gateway.ready:
        return gateway.service
    return await _unless_client_leaves(request, gateway.wait_for_service())


async def _released_after(events, ticket):
    try:
        async for event in events:
            yield event
    finally:
        await events.aclose()  # a client that left mid-stream: this aborts its requests in the engine
        ticket.release()


class ClientDisconnected(Exception):
    pass


async def _unless_client_leaves(request: Request, work):
    """Await work; if the client disconnects first, cancel it (which aborts its engine requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    left = True
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        left = not task.done()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()  # takes effect only when the task next runs: wait for it, so the abort is done
            await asyncio.wait({task})
    if left:
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it: nobody is there to answer
        raise ClientDisconnected()
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request, state: State) -> Response:
    return await _generate(request, state.gateway, ChatCompletionRequest, "chat_job")


@post("/v1/completions", status_code=200)
async def completions(request: Request, state: State) -> Response:
    return await _generate(request, state.gateway, CompletionRequest, "completion_job")


def _model_card(gateway: Gateway, name: str) -> dict:
    return {"id": name, "object": "model", "created": gateway.created, "owned_by": "kvgate"}


@get("/v1/models")
async def list_models(state: State) -> Response:
    gateway = state.gateway
    return json_response({"object": "list", "data": [_model_card(gateway, n) for n in gateway.model_names]})


@get("/v1/models/{model_id:path}")
async def get_model(model_id: str, state: State) -> Response:
    gateway, name = state.gateway, model_id.lstrip("/")
    if name not in gateway.model_names:
        raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
    return json_response(_model_card(gateway, name))


@get("/health", opt={"public": True})
async def health(state: State) -> Response:
    gateway = state.gateway
    if gateway.ready:
        return json_response({"status": "ok"})
    if gateway.restarting:
        retry = gateway.retry_after()
        return json_response({"status": "restarting", "error": gateway.error, "retry_after_s": retry}, status=503,
                             headers={"Retry-After": str(retry)})
    status = "loading" if gateway.engine is None and gateway.load_error is None else "unavailable"
    return json_response({"status": status, "error": gateway.error}, status=503)


@get("/metrics", opt={"public": True})
async def metrics(state: State) -> Response:
    return Response(state.gateway.metrics.render(), media_type=CONTENT_TYPE)


@get("/info")
async def info(state: State) -> Response:
    gateway = state.gateway
    service = gateway.require_service()
    engine, cfg = service.engine, gateway.config
    return json_response({
        "model_id": gateway.model_names[0], "model_path": engine.info.model_dir,
        "model_dtype": engine.info.dtype, "model_device_type": engine.info.device,
        "max_model_len": engine.info.max_model_len, "max_total_tokens": engine.info.max_model_len,
        "max_input_tokens": engine.info.max_model_len - 1,
        "max_batch_total_tokens": engine.info.max_batch_total_tokens,
        "max_num_seqs": engine.config.max_num_seqs, "max_num_batched_tokens": engine.config.max_num_batched_tokens,
        "block_size": engine.info.block_size, "num_kv_blocks": engine.info.num_kv_blocks,
        "max_concurrent_requests": cfg.max_concurrent_requests, **service.limits.info(),
        "max_request_body_bytes": cfg.max_body_bytes, "version": VERSION,
    })


async def _read_for_model(request: Request, gateway: Gateway, struct: type):
    """(service, body) of a request that names a model, which must be the one served."""
    service = gateway.require_service()
    req = await _read(request, gateway, struct)
    service.model_name(req.model)
    return service, req


@post("/tokenize", status_code=200)
async def tokenize(request: Request, state: State) -> Response:
    service, req = await _read_for_model(request, state.gateway, TokenizeRequest)
    engine = service.engine
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of prompt and messages", "prompt")
    if req.messages is not None:
        text = engine.chat_prompt(chat_messages(req))
        tokens = engine.tokenize_chat(text)
    else:
        tokens = engine.processor.tokenize(req.prompt, add_special_tokens=req.add_special_tokens)[1]
    return json_response({"tokens": tokens, "count": len(tokens), "max_model_len": engine.info.max_model_len})


@post("/detokenize", status_code=200)
async def detokenize(request: Request, state: State) -> Response:
    service, req = await _read_for_model(request, state.gateway, DetokenizeRequest)
    vocab = service.engine.info.vocab_size
    bad = next((t for t in req.tokens if t >= vocab), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary [0, {vocab})", "tokens")
    return json_response({"prompt": service.engine.tokenizer.decode(req.tokens)})


ROUTES = [chat_completions, completions, list_models, get_model, health, metrics, info, tokenize, detokenize]
