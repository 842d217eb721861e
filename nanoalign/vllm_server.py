"""The vLLM-server rollout backend (`--vllm-mode server`): an HTTP client for a running vLLM server, and
pushing the trainer's weights into it.

Start a server with `python -m nanoalign.serve --model MODEL`, then train with `--vllm-mode server --vllm-url URL`.
`VLLMServer` is the backend train.py builds from two halves:

    client = VLLMClient(url) if rank == 0 else None      # only rank 0 talks HTTP
    sync = WeightSync(policy, client, rank=rank)          # every rank; connects once
    sync.sync(version="0")                                # every rank; before the first rollout, then every k steps
    gens = client.generate(prompts, images, n=G, max_tokens=256, temperature=1.0, stop_ids=stop_ids)

Generation goes through the OpenAI chat API (images as base64 PNG data URLs) with `return_token_ids`:
vLLM returns the prompt ids it used (image placeholders expanded) and each sample's ids, so the trainer
scores exactly what was sampled (rollout.chunk_rollouts checks the prompt ids against the trainer's
processor). The server runs with `--logprobs-mode processed_logprobs`: log softmax(z / temperature)
after top_p, the distribution the tokens were drawn from.

Weight sync uses vLLM's own routes (pause, start_weight_update, update_weights, finish_weight_update,
cache resets, resume): no private vLLM internals, no shared files. The tensors travel through a process
group between trainer rank 0 and the vLLM workers: on GPUs vLLM's "nccl" engine (driven by its own
trainer-side engine), on CPUs a gloo group and nanoalign's "gloo" engine (nanoalign/vllm_engine.py, a vLLM
plugin), one flat buffer per bucket of same-dtype tensors (`plan_buckets`). Every rank takes part in a
gather of every parameter, in the same order, but only rank 0 receives the full tensors (loading.gather_full)
and sends; its failures are shared at the end of `sync`, so every rank raises instead of some waiting forever.

Simplifications: one server (no fan-out across servers); no LoRA-only sync; frozen parameters are sent too.
"""

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import torch
import torch.distributed as dist

from nanoalign.loading import gather_full
from nanoalign.lora import adapted_layers, merged_weight, sync_parameters
from nanoalign.rollout import Generation, Rollout, chunk_rollouts, openai_messages, sync_due
from nanoalign.runtime import agree_on_failure
from nanoalign.transfer import gloo_group, plan_buckets, wire_dtype

SERVE_HINT = "start one with `python -m nanoalign.serve --model MODEL --port PORT` and pass its URL with --vllm-url"


class VLLMError(RuntimeError):
    """The vLLM server is unreachable, died, timed out, or refused a request; the message says which."""


# --------------------------------------------------------------------------- HTTP client


class VLLMClient:
    """One vLLM server's health, chat generation with images, and weight-sync routes. Every request has a
    timeout; those safe to repeat (GETs, generation) are retried on a refused or dropped connection."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, timeout: float = 120.0, retries: int = 2):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self._answered = False  # once the server has answered, a refused connection means it died
        self._model: str | None = None  # the served model's name, asked once

    def _request(self, method: str, path: str, body: dict | None = None, *, retry: bool = False, timeout: float | None = None):
        """One HTTP request; returns the decoded JSON answer (None for an empty body)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={"Content-Type": "application/json"})
        timeout = self.timeout if timeout is None else timeout
        for attempt in range(self.retries + 1 if retry else 1):
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    raw = response.read()
                self._answered = True
                return json.loads(raw) if raw else None
            except urllib.error.HTTPError as err:  # the server answered, with an error status
                self._answered = True
                detail = err.read().decode(errors="replace")[:2000]
                if err.code == 404 and not path.startswith("/v1/"):
                    detail += " (vLLM serves the weight-sync and cache routes only with VLLM_SERVER_DEV_MODE=1; nanoalign.serve sets it)"
                raise VLLMError(f"vLLM server {self.url} answered {err.code} to {method} {path}: {detail}") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as err:  # refused, reset, timed out, ...
                reason = getattr(err, "reason", err)
                if isinstance(reason, TimeoutError):
                    raise VLLMError(f"vLLM server {self.url} did not answer {method} {path} within {timeout:.0f} s. If it is "
                                    "just slow (a big batch, long completions), raise --vllm-timeout; otherwise check its log.") from None  # fmt: skip
                if attempt < (self.retries if retry else 0):
                    time.sleep(1.0 + attempt)  # a restarting or briefly overloaded server
                    continue
                if self._answered:
                    raise VLLMError(f"vLLM server {self.url} stopped answering ({reason}) during {method} {path}; it answered "
                                    "before, so it has probably died (out of memory?). Check its log and restart it.") from None  # fmt: skip
                raise VLLMError(f"vLLM server {self.url} is not reachable ({reason}); {SERVE_HINT}") from None

    def _post(self, path: str, body: dict | None = None, **kwargs):
        return self._request("POST", path, body, **kwargs)

    def health(self) -> None:
        """Raise VLLMError unless the server answers GET /health."""
        self._request("GET", "/health", retry=True, timeout=min(self.timeout, 10.0))

    def wait_until_ready(self, timeout: float = 300.0, process=None) -> None:
        """Poll /health until the server is up; fail early if `process` (a Popen of it) exits first."""
        deadline = time.monotonic() + timeout
        while True:
            if process is not None and process.poll() is not None:
                raise VLLMError(f"the vLLM server exited (code {process.returncode}) before {self.url} was ready; see its log")
            try:
                self._request("GET", "/health", timeout=5.0)
                return
            except VLLMError:
                if time.monotonic() > deadline:
                    raise VLLMError(f"vLLM server {self.url} was not ready within {timeout:.0f} s; check its log") from None
                time.sleep(1.0)

    def served_model(self) -> str:
        """The name the server serves its model under (GET /v1/models)."""
        if self._model is None:
            self._model = self._request("GET", "/v1/models", retry=True)["data"][0]["id"]
        return self._model

    def generate(self, prompts: list[list[dict]], images: list[list], *, n: int, max_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, stop_ids: set[int] | None = None, seed: int | None = None) -> list[Generation]:  # fmt: skip
        """n samples for each prompt (chat messages with {"type": "image"} placeholders + its PIL images), sent
        concurrently (vLLM batches them). top_k, min_p and repetition penalty are off: the losses' distribution."""
        if len(prompts) != len(images):
            raise ValueError(f"generate: {len(prompts)} prompts but {len(images)} image lists")
        model = self.served_model()

        def one(i: int) -> Generation:
            body = {
                "model": model,
                "messages": openai_messages(prompts[i], images[i], f"prompt {i}"),
                "n": n, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,  # vLLM: top_k 0 = off
                "logprobs": True, "return_token_ids": True, "skip_special_tokens": True,
            }  # fmt: skip
            if stop_ids:
                body["stop_token_ids"] = sorted(stop_ids)
            if seed is not None:
                body["seed"] = seed + i
            return parse_generation(self._post("/v1/chat/completions", body, retry=True), n)

        with ThreadPoolExecutor(max_workers=max(1, min(len(prompts), 64))) as pool:
            return list(pool.map(one, range(len(prompts))))

    # --- the weight-sync routes (also vLLM's VLLMWeightSyncClient protocol, used by its NCCL engine)
    def get_world_size(self) -> int:  # vLLM workers that receive weights (tensor x pipeline x data parallel)
        return int(self._request("GET", "/get_world_size", retry=True)["world_size"])

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._post("/init_weight_transfer_engine", {"init_info": init_info})

    def pause(self) -> None:  # abort: the trainer has nothing in flight; anything else samples the old weights
        self._post("/pause?mode=abort")

    def start_weight_update(self) -> None:
        self._post("/start_weight_update")

    def update_weights(self, update_info: dict) -> None:
        self._post("/update_weights", {"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._post("/finish_weight_update", {"weight_version": weight_version})

    def reset_caches(self) -> None:
        """Drop cached KV blocks and vision-encoder outputs: both were computed with the old weights."""
        for _ in range(5):  # the prefix-cache reset fails while blocks are still held; they are freed shortly
            if self._post("/reset_prefix_cache").get("success", True):
                break
            time.sleep(0.2)
        else:
            raise VLLMError(f"vLLM server {self.url} could not reset its prefix cache after a weight sync (requests still running?)")
        self._post("/reset_encoder_cache")

    def resume(self) -> None:
        self._post("/resume")

    def shutdown_weight_transfer_engine(self) -> None:
        self._post("/shutdown_weight_transfer_engine")


def parse_generation(response: dict, n: int) -> Generation:
    """One chat-completion answer (return_token_ids + logprobs) -> Generation."""
    if "prompt_token_ids" not in response or response["prompt_token_ids"] is None:
        raise VLLMError("the vLLM server ignored return_token_ids; it must be vLLM >= 0.10.2 (nanoalign tests 0.32)")
    choices = sorted(response["choices"], key=lambda c: c["index"])
    if len(choices) != n:
        raise VLLMError(f"asked vLLM for n={n} samples, got {len(choices)}")
    ids = [c["token_ids"] for c in choices]
    logprobs = [[entry["logprob"] for entry in c["logprobs"]["content"]] for c in choices]
    for i, (c, tokens, lps) in enumerate(zip(choices, ids, logprobs)):
        if len(tokens) != len(lps):
            raise VLLMError(f"vLLM returned {len(tokens)} token ids but {len(lps)} log-probs for sample {i}")
        if c["finish_reason"] not in ("stop", "length"):  # e.g. "abort": cut short by a /pause
            raise VLLMError(f"vLLM ended sample {i} with finish_reason {c['finish_reason']!r}; was the server paused by another trainer?")
    return Generation(response["prompt_token_ids"], ids, logprobs, [c["finish_reason"] == "stop" for c in choices],
                      [c["message"]["content"] or "" for c in choices])  # fmt: skip


class VLLMServer:
    """The rollout backend: every rank sends its own prompts; every vllm_sync_every steps WeightSync pushes the weights."""

    def __init__(self, cfg, policy, processor, *, stop_ids: set[int], rank: int, device, dtype: torch.dtype | None = None):
        self.client = VLLMClient(cfg.vllm_url, timeout=cfg.vllm_timeout)
        self.client.health()  # fail now, with the URL in the message, rather than at the first rollout
        self.weight_sync = WeightSync(policy, self.client if rank == 0 else None, rank=rank, timeout=cfg.vllm_timeout, dtype=dtype)
        self.processor, self.stop_ids, self.device = processor, stop_ids, device
        self.sync_every, self.synced_step = cfg.vllm_sync_every, None  # the step whose weights the server has

    def sample(self, chunks: list[list[dict]], n: int, *, max_tokens: int, temperature: float, top_p: float) -> list[Rollout]:
        error, rollouts = None, []
        samples = [s for chunk in chunks for s in chunk]
        try:  # one batch of requests for the whole round: the server batches them together
            generations = self.client.generate([s["prompt"] for s in samples], [s["images"] for s in samples], n=n, max_tokens=max_tokens,
                                               temperature=temperature, top_p=top_p, stop_ids=self.stop_ids)  # fmt: skip
            rollouts = chunk_rollouts(self.processor, chunks, generations, n)
        except (VLLMError, ValueError) as err:
            error = err
        agree_on_failure(error, self.device)  # a dead server stops every rank, not just the one that asked
        return rollouts

    def sync(self, step: int) -> dict:
        if not sync_due(self.synced_step, step, self.sync_every):
            return {}
        metrics = self.weight_sync.sync(version=str(step))  # every rank gathers; rank 0 sends
        self.synced_step = step
        return metrics

    def close(self) -> None:
        self.weight_sync.close()


# --------------------------------------------------------------------------- weight sync


def address_towards(url: str) -> str:
    """This machine's address on the route to the server (a UDP connect sends nothing)."""
    host = urllib.parse.urlparse(url).hostname or "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(host), 9))
        return s.getsockname()[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class WeightSync:
    """Pushes the trainer's weights into the vLLM server. Build it and call `sync` on EVERY rank; only rank 0
    has a client. `model`: the (FSDP2-sharded) Policy or an HF model; its parameter names (no "hf.") are the
    HF checkpoint names vLLM's load_weights maps itself. `dtype`: the engine's (None: the parameters' own);
    floating-point weights travel in it, cast shard by shard before the gather (bf16: half the bytes)."""

    def __init__(self, model, client: VLLMClient | None, *, rank: int, backend: str | None = None,
                 bucket_mb: float = 16.0, timeout: float = 120.0, dtype: torch.dtype | None = None):  # fmt: skip
        if rank == 0 and client is None:
            raise ValueError("WeightSync: rank 0 needs a VLLMClient (the other ranks pass None)")
        self.hf_model, self.client, self.rank, self.timeout = getattr(model, "hf", model), client if rank == 0 else None, rank, timeout
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.timeout = timeout
        self.dtype = dtype
        # LoRA: only the adapted layers' weights are sent, merged (nanoalign/lora.py); the rest never change
        self.num_bytes = sum(p.numel() * wire_dtype(p, dtype).itemsize for _, p in sync_parameters(self.hf_model))
        self.group = self.nccl_engine = None
        if self.backend == "nccl" and adapted_layers(self.hf_model):
            raise ValueError("--lora-rank with --vllm-mode server: vLLM's NCCL weight transfer sends every parameter "
                             "unmerged; use --vllm-mode colocate, or in-process rollouts, for LoRA on GPUs")  # fmt: skip
        if self.backend == "nccl":
            self._init_nccl()
        elif self.backend == "gloo":
            if self.client is not None:
                self._init_gloo()
        else:
            raise ValueError(f"WeightSync: backend {self.backend!r} is not 'nccl' or 'gloo'")

    def _init_gloo(self) -> None:
        """Rank 0 opens a TCPStore; the vLLM workers join a gloo group through it during the HTTP init."""
        world_size = 1 + self.client.get_world_size()
        address = address_towards(self.client.url)
        store = dist.TCPStore(address, 0, world_size, is_master=True, timeout=timedelta(seconds=self.timeout), wait_for_workers=False)
        init_info = {
            "master_address": address, "master_port": store.port, "rank_offset": 1, "world_size": world_size,
            "bucket_bytes": self.bucket_bytes, "timeout_s": self.timeout,
        }  # fmt: skip
        joined: dict = {}

        def join():  # blocks until every vLLM worker has connected (or the timeout passes)
            try:
                joined["group"] = gloo_group(address, store.port, 0, world_size, self.timeout, store=store)
            except RuntimeError as err:
                joined["error"] = err

        # Our half of the rendezvous on a thread, the HTTP request (which returns once the workers
        # joined) here: a refused init (wrong backend, old nanoalign on the server) surfaces at once.
        thread = threading.Thread(target=join, daemon=True)
        thread.start()
        try:
            self.client.init_weight_transfer_engine(init_info)
        except VLLMError as err:
            raise VLLMError(f"{err}\nThe server must run nanoalign's gloo engine: start it with `python -m nanoalign.serve` (it "
                            "passes --weight-transfer-config '{\"backend\":\"gloo\"}' on CPUs), with nanoalign installed in the "
                            "server's environment.") from None  # fmt: skip
        thread.join(self.timeout)
        if "group" not in joined:
            reason = joined.get("error", "timed out")
            raise VLLMError(f"the vLLM workers of {self.client.url} did not join the gloo group at {address}:{store.port}: {reason}")
        self.group = joined["group"]

    def _init_nccl(self) -> None:
        """GPU: vLLM's own trainer-side NCCL engine, which speaks to its built-in "nccl" engine."""
        from vllm.distributed.weight_transfer import ModuleSource, WeightTransferTrainerFactory
        from vllm.distributed.weight_transfer.base import ParamMeta, materialize_full_tensor
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        dtype = self.dtype

        class EngineDtypeSource(ModuleSource):  # ModuleSource, with floating-point weights in the engine's dtype
            def metadata(self):
                return [ParamMeta(n, wire_dtype(p, dtype), tuple(p.shape)) for n, p in self._module.named_parameters()]

            def __iter__(self):  # cast the shard, then gather (full_tensor(), on every rank)
                for name, param in self._module.named_parameters():
                    yield name, materialize_full_tensor(param.detach().to(wire_dtype(param, dtype)))

        if self.client is not None:
            world_size, address, port = 1 + self.client.get_world_size(), address_towards(self.client.url), free_port()
        else:  # non-sender ranks only gather; the rendezvous fields are unused there
            world_size, address, port = 0, "", 0
        info = NCCLTrainerInitInfo(master_address=address, master_port=port, world_size=world_size, rank=self.rank, packed=True,
                                   packed_buffer_size_bytes=self.bucket_bytes)  # fmt: skip
        source = EngineDtypeSource(self.hf_model)
        self.nccl_engine = WeightTransferTrainerFactory.trainer_init(info, client=self.client, source=source)

    def sync(self, version: str | None = None) -> dict[str, float]:
        """Send every parameter to the server; returns {"vllm/sync_s", "vllm/sync_mb"}. Every rank calls it. Rank 0:
        pause -> start_weight_update -> update_weights (on a thread, while this one broadcasts) -> finish -> reset caches -> resume."""
        start = time.perf_counter()
        if self.backend == "nccl":
            # Rank 0's HTTP calls are agreed on before and after the gathers: a failure stops every rank, not in a NCCL wait.
            self._agree(self._on_sender(self.client.pause) if self.client is not None else None)
            self.nccl_engine.send_weights()  # every rank gathers; the sender also drives start/update/finish
            error = self._on_sender(lambda: (self.client.reset_caches(), self.client.resume())) if self.client is not None else None
            self._agree(error)  # also: no rank samples before the server serves the new weights
        else:
            self._sync_gloo(version)
        return {"vllm/sync_s": time.perf_counter() - start, "vllm/sync_mb": self.num_bytes / 1e6}

    def _sync_gloo(self, version: str | None) -> None:
        # Parameters are looked up at every sync: FSDP2 swaps the registered tensors between the
        # sharded DTensors and gathered copies, so a list kept from an earlier step could be stale.
        params = sync_parameters(self.hf_model)  # the same order on every rank
        names, dtypes, shapes = zip(*[(n, str(wire_dtype(p, self.dtype)).removeprefix("torch."), list(p.shape)) for n, p in params])
        update_info = {"names": list(names), "dtype_names": list(dtypes), "shapes": list(shapes)}
        error: Exception | None = None
        update = in_flight = None
        pool = ThreadPoolExecutor(max_workers=1) if self.client is not None else None
        if self.client is not None:
            try:
                self.client.pause()
                self.client.start_weight_update()
                # update_weights returns once the server received every bucket: on a thread while this one broadcasts.
                update = pool.submit(self.client.update_weights, update_info)
            except VLLMError as err:
                error = err
        for bucket in plan_buckets(update_info["dtype_names"], update_info["shapes"], self.bucket_bytes):
            # Every rank gathers, in the same order, even after an error on rank 0: a rank that stopped early would
            # leave the others waiting in a collective. Only rank 0 receives full tensors, a bucket at a time.
            tensors = [merged_weight(self.hf_model, *params[i], gather_full, wire_dtype(params[i][1], self.dtype)) for i in bucket]
            if self.client is None or error is not None:
                continue
            try:
                if update.done():  # the server refused the update before receiving anything
                    update.result()
                # (sum of numels,) one dtype; a tensor alone in its bucket is sent as it is, no copy
                flat = tensors[0].reshape(-1) if len(tensors) == 1 else torch.cat([t.reshape(-1) for t in tensors])
                if in_flight is not None:
                    in_flight[0].wait()  # at most two buffers alive: the one being sent, the one packed
                in_flight = (self.group.broadcast(flat, 0), flat)
            except (RuntimeError, VLLMError) as err:  # gloo raises RuntimeError when the peer is gone
                error = err
        if self.client is not None and error is None:
            try:
                if in_flight is not None:
                    in_flight[0].wait()
                update.result(timeout=self.timeout)
                self.client.finish_weight_update(version)
                self.client.reset_caches()
                self.client.resume()
            except (RuntimeError, VLLMError, TimeoutError) as err:
                error = err
        if pool is not None:
            pool.shutdown(wait=False)  # never join a request thread that may be stuck on a dead server
        if error is not None and self.client is not None:
            if not isinstance(error, VLLMError):
                error = self._explain(error)
            try:
                self.client.resume()  # the server keeps its old weights; leave it serving, not paused
            except VLLMError:
                pass  # it is down: the error above already says so
        self._agree(error)  # also, as a collective, no rank goes on to sample before the server serves the new weights

    @staticmethod
    def _on_sender(call) -> Exception | None:
        """Run one of rank 0's server calls; its error is returned for _agree, not raised."""
        try:
            call()
        except VLLMError as err:
            return err
        return None

    @staticmethod
    def _agree(error: Exception | None) -> None:
        """Every rank raises if rank 0 failed (a collective over the default group, any transport)."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            agree_on_failure(error, torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu")
        elif error is not None:
            raise error

    def _explain(self, err: Exception) -> VLLMError:
        """A transport error, with what the server's health says about it."""
        try:
            self.client.health()
            state = "the server still answers /health; check its log for the failed update"
        except VLLMError as health_err:
            state = str(health_err)
        return VLLMError(f"weight sync to {self.client.url} failed: {type(err).__name__}: {err}. {state}")

    def close(self) -> None:
        """Release the server's side of the connection, so another trainer can connect later."""
        if self.client is not None and self.group is not None:
            self.client.shutdown_weight_transfer_engine()
        self.group = None
        if self.nccl_engine is not None:
            self.nccl_engine.shutdown()
