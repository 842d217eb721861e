"""The model families people train today, end to end, on their tiny built-ins (nanoalign/tiny.py):
Qwen2-VL, Qwen3-VL (M-RoPE + deepstack), Qwen3.5 (hybrid linear/full attention), Gemma 3
(token_type_ids, a begin-of-image marker that is not the image token), Gemma 4 (image token count
depends on the size) and SmolVLM (each image split into tiles + a global view).

Per family, parametrized, sharing one session-scoped build of each model:
  * the loss mask counts answer tokens only; image tokens == vision features, per sample, with 1
    and 2 images per sample; each row gets its own images;
  * truncation never cuts image tokens (refused, naming the sample); answers are cut as text;
  * conversations whose later user turns bring images: the rows and the loss mask token by token,
    and 2 SFT steps over a dataset of them on 1 process and on 2 FSDP ranks (here with the two
    families of test_batch.py);
  * 2-rank FSDP2 == 1 process: the loss and every parameter's gradient;
  * 2 steps of sft, dpo, mpo, grpo, gspo, rloo and online_dpo through train.train with finite losses;
  * export round trip: from_pretrained reloads the trained weights and gives the same log-probs;
  * in-process generation with images (FSDP-gathered) is greedy under the training forward.
"""

import inspect
import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from nanoalign import sft
from nanoalign.batch import check_prompt_fits, pack_rows, render
from nanoalign.data import BadSampleError
from bench.common import hf_state_dict, load_hf_model
from nanoalign.loading import export_hf
from nanoalign.model import Policy, chunked_logps, load_processor, shard_policy, vision_module
from nanoalign.rl import completion_batch
from nanoalign.rollout import generating, sample_completions
from nanoalign.runtime import Run, device_mesh

TESTS = Path(__file__).resolve().parent
from conftest import EXTRA_FAMILIES, FAMILIES, family_params, one_thread, torchrun  # noqa: E402
from conftest import CORE_FAMILIES, assert_same_step  # noqa: E402
from nanoalign.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from test_sft_train import _run_stub as sft_run_stub  # noqa: E402
from test_sft_train import flags as sft_flags  # noqa: E402
from parity_worker import parity_samples, parity_step, sharded_policy  # noqa: E402
from test_algorithms import LOG2, assert_logged, run_train, steps, train_module  # noqa: E402
from test_batch import encode, runs, samples  # noqa: E402,F401  (samples: the A-E conversations fixture)
from test_batch import test_images_in_later_turns_stand_where_their_turn_puts_them as check_later_turn_images  # noqa: E402
from test_tiny import test_build_is_byte_identical as assert_build_is_byte_identical  # noqa: E402

ALGOS = ("sft", "dpo", "mpo", "grpo", "gspo", "rloo", "online_dpo")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def family_dirs(nanoalign_cache) -> dict[str, Path]:
    """Every family's tiny model, built once into the session cache (a few seconds each)."""
    from nanoalign.tiny import ensure_tiny

    return {name: ensure_tiny(name) for name in EXTRA_FAMILIES}


@pytest.fixture(scope="module", params=family_params(EXTRA_FAMILIES))
def family(request, family_dirs):
    """(model dir, processor, fp32 HF model in eval mode, stop ids as train.py derives them)."""
    model_dir = str(family_dirs[request.param])
    processor, model = load_processor(model_dir), load_hf_model(model_dir).eval()
    eos = model.generation_config.eos_token_id
    stop_ids = {processor.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    return model_dir, processor, model, stop_ids


def is_image_token(processor, input_ids) -> torch.Tensor:
    """Positions holding a token the vision features replace (Gemma 3: the soft token, not the marker)."""
    ids = [i for i in processor.image_token_ids if i is not None]
    return torch.isin(input_ids, torch.tensor(ids))


def num_vision_features(model, mm_inputs) -> int:
    """How many feature vectors the vision tower gives for all images of a batch: what the model
    puts in place of image tokens. Each family's get_image_features takes its own subset of the
    processor outputs (grid sizes, patch positions, tile masks) and returns a list of per-image
    (N_i, H) tensors or one (..., H) tensor."""
    params = inspect.signature(model.model.get_image_features).parameters
    with torch.no_grad():
        out = model.model.get_image_features(**{k: v for k, v in mm_inputs.items() if k in params})
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(features, (list, tuple)):
        return sum(len(f) for f in features)
    return features.numel() // features.shape[-1]


@pytest.mark.parametrize("name", family_params(EXTRA_FAMILIES))
def test_build_is_deterministic(name, family_dirs, tmp_path):
    # Built twice, byte for byte the same files (weights, tokenizer, processor): caches can be trusted.
    assert_build_is_byte_identical(name, family_dirs, tmp_path)


# -----------------------------------------------------------------------------
# the batch: loss mask, image tokens vs vision features, truncation


def test_loss_mask_and_image_tokens(family, samples):
    _, processor, model, _ = family
    tok = processor.tokenizer
    batch = encode(family, samples, ["A", "B"])
    image = is_image_token(processor, batch.input_ids)
    assert batch.mask[image].sum() == 0 and batch.mask[batch.attention_mask == 0].sum() == 0
    assert (batch.attention_mask[0] == 0).any(), "row A should be padded (shorter than B)"
    for row, key in enumerate(["A", "B"]):
        messages, images = samples[key]
        # Nothing of the prompt counts (system, user text, every image token, the generation prompt) ...
        prompt = processor(text=[render(processor, messages[:1], add_generation_prompt=True)], images=[images],
                           return_tensors="pt", add_special_tokens=False)  # fmt: skip
        num_prompt = prompt["input_ids"].shape[1]
        assert batch.mask[row, :num_prompt].sum() == 0 and batch.mask[row, num_prompt] == 1
        # ... and the counted runs are the assistant answers, each through its end-of-turn token.
        # (SmolVLM's template puts the space after "Assistant:" into the answer: the model writes it.)
        answers = [m["content"][0]["text"] for m in messages if m["role"] == "assistant"]
        spans = runs(batch.mask[row])
        assert [tok.decode(batch.input_ids[row, s:e]).lstrip(" ") for s, e in spans] == [a + tok.eos_token for a in answers]
        # Image tokens in the row == the vision tower's features for this sample's own images.
        alone = encode(family, samples, [key])
        assert int(image[row].sum()) == num_vision_features(model, alone.mm_inputs) > 0
    assert int(image.sum()) == num_vision_features(model, batch.mm_inputs)

    # Each row gets its own images: a row's log-probs in the batch equal the row's alone (any mix-up
    # of images, per-row tiles, token types or M-RoPE positions across rows would change them) ...
    policy = Policy(model, logps_chunk_size=7)
    with torch.no_grad():
        logps_both, _ = policy(**batch.model_inputs())
        for row, key in enumerate(["A", "B"]):
            alone = encode(family, samples, [key])
            length = alone.input_ids.shape[1]
            assert torch.equal(batch.input_ids[row, :length], alone.input_ids[0])
            assert_close(logps_both[row, :length], policy(**alone.model_inputs())[0][0], atol=2e-5, rtol=0)
        # ... and the images matter, so that check can fail: another first image changes B's answer log-probs.
        swapped = dict(samples, B=(samples["B"][0], [samples["C"][1][0], samples["B"][1][1]]))
        logps_swapped, _ = policy(**encode(family, swapped, ["B"]).model_inputs())
    assert (logps_swapped[0] - logps_both[1, : logps_swapped.shape[1]]).abs().max() > 1e-4


def test_images_in_later_turns(family, samples):
    # Three turns whose second user turn brings an image: rows and loss mask token by token (test_batch.py).
    check_later_turn_images(family, samples)


def test_truncation_never_cuts_image_tokens(family, samples):
    _, processor, model, _ = family
    full = encode(family, samples, ["A"])
    last_image = int(is_image_token(processor, full.input_ids[0]).nonzero().max())
    # A max_length that would cut the last image token: refused, naming the sample.
    with pytest.raises(BadSampleError, match=r"^sample A: .* 1 image tokens lie past --max-length"):
        encode(family, samples, ["A"], max_length=last_image)
    # With 2 images (of different sizes), a cut anywhere in the second image's tokens is refused too.
    tokens_b = is_image_token(processor, encode(family, samples, ["B"]).input_ids[0]).nonzero().flatten()
    with pytest.raises(BadSampleError, match=r"^sample B: .* 3 image tokens lie past --max-length"):
        encode(family, samples, ["B"], max_length=int(tokens_b[-3]))
    # An answer that overflows is cut as text: the row is a prefix of the full row, the prompt intact.
    cut = encode(family, samples, ["A"], max_length=last_image + 3)
    assert cut.num_truncated == 1 and cut.input_ids.shape[1] == last_image + 3
    assert torch.equal(cut.input_ids[0], full.input_ids[0, : last_image + 3])
    for key, value in cut.mm_inputs.items():  # per-token extras (token_type_ids, ...) are cut with the row
        if value.shape[:2] == full.input_ids.shape:
            assert torch.equal(value[0], full.mm_inputs[key][0, : last_image + 3]), key
    with torch.no_grad():
        assert torch.isfinite(model(**cut.model_inputs()).logits).all()
    # --skip-bad-samples finds such a sample when it is fetched (batch.check_prompt_fits), before
    # anything is built for it; a sample that fits passes.
    sample = {"sample_id": "sample B", "messages": samples["B"][0], "images": samples["B"][1]}
    with pytest.raises(BadSampleError, match=r"^sample B: .* image tokens lie past --max-length"):
        check_prompt_fits(processor, int(tokens_b[-1]), "sft", sample)
    check_prompt_fits(processor, int(tokens_b[-1]) + 1, "sft", sample)


# -----------------------------------------------------------------------------
# capped logits (Gemma's final_logit_softcapping)


def test_chunked_logps_with_softcap_match_autograd():
    # l_t = log_softmax(c tanh(h W^T / c) / temp)[target], values and gradients, against plain autograd.
    torch.manual_seed(0)
    hidden = (3 * torch.randn(2, 5, 8)).requires_grad_()  # large logits, so the cap bends them
    weight = torch.randn(11, 8).requires_grad_()
    targets = torch.randint(0, 11, (2, 5))
    upstream = torch.randn(2, 5)
    cap, temp = 2.0, 0.7
    logps, entropy = chunked_logps(hidden, weight, targets, temp, chunk_size=3, with_entropy=True, softcap=cap)
    grads = torch.autograd.grad((logps * upstream).sum(), (hidden, weight))
    logits = cap * torch.tanh(hidden @ weight.T / cap) / temp
    expected = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (hidden, weight))
    assert (logits * temp).abs().max() <= cap and (hidden @ weight.T).abs().max() > 3 * cap  # the cap is active
    assert_close(logps, expected)
    assert_close(entropy, -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1))
    for grad, want in zip(grads, expected_grads):
        assert_close(grad, want)


# -----------------------------------------------------------------------------
# FSDP2: 2 ranks == 1 process


@pytest.fixture(scope="session")
def two_rank_steps(family_dirs, tmp_path_factory) -> dict:
    """sft:2:1 on 2 ranks (torchrun, gloo) for every family, in one launch."""
    out = tmp_path_factory.mktemp("families_parity") / "two_ranks.pt"
    proc = torchrun(str(TESTS / "families_worker.py"), str(out), *[str(family_dirs[n]) for n in EXTRA_FAMILIES], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(out)


@pytest.mark.parametrize("name", family_params(("tiny", *EXTRA_FAMILIES)))
def test_fsdp_two_ranks_match_one_process(name, request, dist_world):
    # sft on 2 ranks x 2 samples == 1 process x the same 4 samples in one micro-batch: the loss, the
    # token count and every parameter's gradient. "tiny" reads the parity runs test_sft_train.py shares
    # (conftest.one_process / two_processes), the others one families_worker.py launch.
    if name == "tiny":
        model_dir = str(request.getfixturevalue("tiny_dirs")[name])
        reference = request.getfixturevalue("one_process")["sft:4:1"]
        two = request.getfixturevalue("two_processes")["sft:2:1"]
    else:
        model_dir = str(request.getfixturevalue("family_dirs")[name])
        reference = parity_step(model_dir, "sft", 4, 1)
        two = request.getfixturevalue("two_rank_steps")[model_dir]
    # Rank 0 has far fewer answer tokens than rank 1; a per-rank token mean would weight them equally.
    assert two["rank_tokens"][0] != reference["num_tokens"] - two["rank_tokens"][0]
    assert_same_step(two, reference, every_gradient_nonzero=name == "tiny")
    # The gradient reaches the vision tower and the (tied or untied) lm_head / embeddings.
    hf = load_hf_model(model_dir)
    tower = vision_module(hf)
    vision = "hf.model." + next(n for n, m in hf.model.named_modules() if m is tower) + "."  # e.g. "hf.model.visual."
    assert any(g.abs().sum() > 0 for k, g in reference["grads"].items() if k.startswith(vision)), "no gradient in the vision tower"
    lm_head = next(k for k, p in Policy(hf).named_parameters() if p is hf.get_output_embeddings().weight)
    assert reference["grads"][lm_head].abs().sum() > 0


# -----------------------------------------------------------------------------
# every algorithm, a couple of steps


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("name", family_params(EXTRA_FAMILIES))
def test_algorithm_runs_two_steps(name, algo, family_dirs, tmp_path, monkeypatch):
    # Tiny batches on the shapes task; RL scores with a reward that almost never ties (-length), so
    # the advantages, and hence the gradients, are not zero; GSPO takes its 2 steps from one
    # generation batch (the second one off-policy). The curves plot and the final checkpoint, a
    # third of such a short run's time and tested in test_sft_train.py, are left out.
    monkeypatch.setattr(train_module, "plot_metrics", lambda *args: [])
    monkeypatch.setattr(train_module, "save_checkpoint", lambda *args, **kwargs: None)
    flags = ["--model", name, "--max-steps", "2", "--batch-size", "2", "--max-completion-length", "8", "--num-shapes-samples", "16"]
    if algo in ("grpo", "gspo", "rloo", "online_dpo"):
        flags += ["--num-generations", "2", "--reward-funcs", "toy_rewards:shorter", "--reward-weights", "1.0"]
    if algo == "gspo":
        flags += ["--steps-per-generation", "2"]
    run_train(tmp_path, algo, *flags)
    records = steps(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert_logged(records, ("loss", "grad_norm"))
    assert any(r["grad_norm"] > 0 for r in records), records
    if algo in ("dpo", "online_dpo"):
        assert records[0]["loss"] == pytest.approx(LOG2, abs=1e-4)  # step 1: policy == reference


# -----------------------------------------------------------------------------
# LLaVA-Instruct-style conversations: a later user turn brings an image


@pytest.fixture(scope="module")
def later_image_data(tmp_path_factory, make_image) -> Path:
    """train.jsonl in TRL's layout: 4 three-turn conversations whose second user turn brings an
    image (the odd ones open with a 168x84 image too), answers of different lengths."""
    root = tmp_path_factory.mktemp("later_images")

    def text(role, value, num_images=0):
        return {"role": role, "content": [{"type": "image"}] * num_images + [{"type": "text", "text": value}]}

    rows = []
    for i in range(4):
        paths = [root / f"{i}-{j}.png" for j in range(1 + i % 2)]
        for j, path in enumerate(paths):
            make_image(10 * i + j, (168, 84) if j < i % 2 else (112, 112)).save(path)
        messages = [text("user", "Let us count shapes.", i % 2), text("assistant", "Sure, show me."),
                    text("user", "How many here?", 1), text("assistant", f"I count {i + 1} shapes."),
                    text("user", "Are you sure?"), text("assistant", "Yes, " * i + "sure.")]  # fmt: skip
        rows.append({"messages": messages, "images": [str(p) for p in paths]})
    (root / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root / "train.jsonl"


def later_image_argv(name: str, data: Path, out_dir: Path, batch_size: int) -> list[str]:
    # A small --lr: Adam's first update moves every weight by about lr x sign(grad), also where the gradient is
    # rounding noise that differs between 1 and 2 ranks (summation order). At the default 2e-3 that alone moved
    # Gemma 4's second-step loss by 4e-5 and its grad norm by 2e-3 (relative) on an AMD EPYC; at 1e-6, 4e-8 and 4e-6.
    return ["--algo", "sft", "--model", name, "--dataset", str(data), "--out-dir", str(out_dir), "--max-steps", "2",
            "--batch-size", str(batch_size), "--max-length", "1024", "--warmup-steps", "1", "--lr", "1e-6", "--eval-split", "",
            "--save-every", "0", "--no-export"]  # fmt: skip


@pytest.fixture(scope="module")
def later_image_two_ranks(family_dirs, tiny_dirs, later_image_data, tmp_path_factory) -> Path:
    """Every family's 2 SFT steps on later_image_data on 2 ranks (1 sample each), in one launch."""
    root = tmp_path_factory.mktemp("later_images_two_ranks")
    (root / "runs.json").write_text(json.dumps([later_image_argv(n, later_image_data, root / n, 1) for n in FAMILIES]))
    proc = torchrun(str(TESTS / "train_worker.py"), str(root / "runs.json"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return root


@pytest.mark.parametrize("name", family_params(FAMILIES))
def test_later_turn_images_train_on_one_and_two_ranks(name, later_image_data, later_image_two_ranks, tmp_path, monkeypatch):
    # The same global batch of 2 conversations per step: 1 process x 2 samples, 2 ranks x 1 sample
    # (rank r reads stream position 2 * step + r). Both train, and give the same loss and gradient norm.
    monkeypatch.setattr(train_module, "plot_metrics", lambda *args: [])
    monkeypatch.setattr(train_module, "save_checkpoint", lambda *args, **kwargs: None)
    train_module.train(train_module.parse_config(later_image_argv(name, later_image_data, tmp_path, 2)))
    one, two = steps(tmp_path), steps(later_image_two_ranks / name)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2]
    assert_logged(one, ("loss", "grad_norm"))
    assert all(r["grad_norm"] > 0 for r in one), one
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


# -----------------------------------------------------------------------------
# export round trip


@pytest.mark.parametrize("name", family_params(FAMILIES))
def test_export_round_trip(name, request, load_family, dist_world, tmp_path):
    # The exported directory reloads through the Auto classes as the same model and processor classes,
    # holds the trained weights tensor for tensor (not the initial ones), and gives the trained policy's
    # log-probs. The core families train 3 steps through train.train and are compared with the last
    # checkpoint loaded into the initial weights; the extra families take one SGD step in-process and
    # export_hf it (so the exported weights are not the checkpoint's own).
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _, world_size, device = dist_world
    dirs = request.getfixturevalue("tiny_dirs" if name in CORE_FAMILIES else "family_dirs")
    model_dir = str(dirs[name])
    original, _, stop_ids = load_family(name)
    if name in CORE_FAMILIES:
        out = tmp_path / "run"
        train_module.train(train_module.parse_config(sft_flags(out, **{"model": name, "max-steps": 3, "save-every": 0})))
        final = out / "final"
        policy = shard_policy(Policy(load_hf_model(model_dir)), device_mesh(world_size, device), bf16=False)
        optimizer = torch.optim.AdamW(policy.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        assert load_checkpoint(latest_checkpoint(out), policy, optimizer, scheduler, rank=0)["step"] == 3
        processor = AutoProcessor.from_pretrained(final)
        assert processor.tokenizer.get_vocab() == load_processor(model_dir).tokenizer.get_vocab()
        # a real batch of one sample, every position compared
        batch = sft.encode([parity_samples()[0]], sft_run_stub(processor, {processor.tokenizer.eos_token_id}))
        real = torch.ones_like(batch.attention_mask[:, 1:], dtype=torch.bool)
    else:
        processor = original
        policy = sharded_policy(model_dir, world_size, device)
        run = Run(sft_config(), processor, policy, None, 0, 1, device, stop_ids, processor.tokenizer.pad_token_id)
        batch = sft.encode(parity_samples(), run)
        # One SGD step, so the exported weights are not the checkpoint's own.
        logps, _ = policy(**batch.model_inputs())
        (-(logps * batch.mask).sum() / batch.mask.sum()).backward()
        with torch.no_grad():
            for p in policy.parameters():
                if p.grad is not None:
                    p -= 0.05 * p.grad
        final = tmp_path / "final"
        export_hf(policy, processor, final, rank=0)
        real = batch.attention_mask[:, 1:].bool()
    trained = hf_state_dict(policy)

    exported = AutoModelForImageTextToText.from_pretrained(final, dtype=torch.float32).eval()
    assert type(exported).__name__ == type(policy.hf).__name__
    assert type(AutoProcessor.from_pretrained(final)).__name__ == type(original).__name__
    state = exported.state_dict()
    assert state.keys() == trained.keys()
    for key, tensor in trained.items():
        assert torch.equal(state[key], tensor), key
    initial = load_hf_model(model_dir).state_dict()
    assert any(not torch.equal(tensor, initial[key]) for key, tensor in trained.items())  # training changed the weights
    # Same outputs: the exported HF model's log-probs equal the trained policy's.
    with torch.no_grad():
        logps, _ = policy(**batch.model_inputs())
        logits = exported(**batch.model_inputs()).logits[:, :-1].float()
    expected = torch.log_softmax(logits, -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    assert_close(logps[:, 1:][real], expected[real], atol=1e-5, rtol=1e-5)


def sft_config():
    from nanoalign.config import Config

    return Config(max_length=1024)


# -----------------------------------------------------------------------------
# in-process generation with images


def test_generation_with_images_is_greedy_under_the_training_forward(family, samples, dist_world):
    # Greedy decoding (left-padded prompts with 1 and 2 images, KV cache, FSDP-gathered weights)
    # must pick, at every step, the arg-max of the training forward on prompt + completion (right
    # padding, no cache): both read the images, token types and positions the same way.
    model_dir, processor, model, stop_ids = family
    _, world_size, device = dist_world
    policy = shard_policy(Policy(load_hf_model(model_dir)), device_mesh(world_size, device), bf16=False)
    prompts = [samples["A"][0][:1], samples["B"][0][:1]]
    images = [samples["A"][1], samples["B"][1]]
    pad_id = processor.tokenizer.pad_token_id
    kwargs = dict(num_generations=1, max_new_tokens=8, greedy=True, stop_ids=stop_ids, pad_id=pad_id, device=device)
    with generating(policy):
        rollout = sample_completions(policy, processor, prompts, images, **kwargs)
    plain = sample_completions(model, processor, prompts, images, **kwargs)  # the unsharded HF model
    assert rollout.completion_ids == plain.completion_ids
    assert all(len(ids) > 0 for ids in rollout.completion_ids)

    masks = [[1] * len(ids) for ids in rollout.completion_ids]
    batch = pack_rows(processor, rollout.prompt_enc, rollout.completion_ids, masks, ["A", "B"], 1024, pad_id)
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits[:, :-1].float()  # position t predicts token t + 1
    logps = torch.log_softmax(logits, -1)
    sampled = logps.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    counted = batch.mask[:, 1:].bool()
    gap = (logps.max(-1).values - sampled)[counted]  # 0 where the sampled token is the arg-max
    assert gap.numel() == sum(len(ids) for ids in rollout.completion_ids)
    assert gap.max() < 1e-4, gap

    # A completion that samples the image token (a weak policy can) is cut before it and counts
    # nothing: as input it would ask for image features that do not exist (Gemma 3: the soft token).
    image_id = next(i for i in processor.image_token_ids if i is not None)
    rollout.completion_ids[0] = rollout.completion_ids[0][:1] + [image_id] + rollout.completion_ids[0][1:]
    run = Run(sft_config(), processor, policy, None, 0, 1, device, stop_ids, pad_id)
    cut = completion_batch(rollout, run, mask_truncated=False)
    assert cut.num_skipped == 1 and cut.mask[0].sum() == 0 and cut.mask[1].sum() == len(rollout.completion_ids[1])
    with torch.no_grad():
        assert torch.isfinite(model(**cut.model_inputs()).logits).all()
