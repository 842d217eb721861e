"""Tests for nanoalign/packing.py (--padding-free): a micro-batch forwarded as one packed sequence is the
same function as the padded one, on every built-in family.

  * per-row log-probs, a loss and every parameter's gradient, padded vs padding-free, within 1e-5
    (fp32), with 1 and with 2 images of different sizes per row (M-RoPE, deepstack, token_type_ids,
    tiles: each family's own path);
  * the check is sharp: one row's positions shifted by one, and it fails;
  * a family with linear-attention layers (Qwen3.5) is refused, naming the reason;
  * sft / dpo / mpo steps through the algorithm modules on 2 FSDP ranks with gradient accumulation,
    padding-free, give the one-process padded step's loss and gradients (DPO pairs stay paired).
"""

import dataclasses

import pytest
import torch
from conftest import FAMILIES, TESTS, assert_same_step, family_params, one_thread, parity_on_two_ranks, torchrun
from parity_worker import parity_step
from test_algorithms import run_train, steps
from test_grpo import FixedRollouts, one_step
from torch.testing import assert_close

from nanoalign import grpo, online_dpo, packing, rloo
from nanoalign.batch import encode_conversations
from nanoalign.config import PRESETS, Config, check_config
from nanoalign.data import prepare_sample
from nanoalign.model import Policy
from nanoalign.shapes import shapes_sample
from nanoalign.tiny import ensure_tiny

PACKABLE = tuple(n for n in FAMILIES if n != "tiny-qwen3.5")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


def conversations(make_image, num_images: int):
    """3 rows of clearly different lengths (answers of 1, ~10 and ~30 tokens), each with num_images
    images of different sizes, so every row is padded by a different amount."""
    questions = ["How many?", "How many shapes are in the image?", "Count the shapes, then name their colours."]
    long_answer = ("<think>I count 3 shapes: a red one, a blue one and a green one.</think> "
                   "The answer is \\boxed{3}. There are three shapes in the image.")  # fmt: skip
    answers = ["2", "I count 2 shapes.", long_answer]
    sizes = [(112, 112), (168, 84), (56, 112)]
    rows, images = [], []
    for b, (question, answer) in enumerate(zip(questions, answers)):
        user = {"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": question}]}
        rows.append([user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}])
        images.append([make_image(10 * b + k, sizes[(b + k) % 3]) for k in range(num_images)])
    return rows, images


sdpa = packing.sdpa_attention_forward


def forward_and_grads(policy, batch, weights):
    """Per-token log-probs (B, T) of the counted tokens and every parameter's gradient of the
    SFT-normalised SUM_{b,t} w_{b,t} M_{b,t} l_{b,t} / SUM M (weights differ per token, so every row's
    every token matters)."""
    policy.hf.zero_grad(set_to_none=True)
    logps, _ = policy(**batch.model_inputs(), logps_mask=batch.mask)
    loss = (logps * batch.mask * weights).sum() / batch.mask.sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.hf.named_parameters() if p.grad is not None}
    return logps.detach(), loss.detach(), grads


@pytest.mark.parametrize("num_images", [1, 2])
@pytest.mark.parametrize("name", family_params(PACKABLE))
def test_padding_free_equals_padded(name, num_images, load_family, make_image, monkeypatch):
    processor, model, stop_ids = load_family(name)
    rows, images = conversations(make_image, num_images)
    batch = encode_conversations(processor, rows, images, ["a", "b", "c"], max_length=1024, stop_ids=stop_ids)
    lengths = batch.attention_mask.sum(1)
    assert lengths.min() < lengths.max()  # padded rows (Gemma 4: image token counts do not follow the size)
    weights = torch.rand(batch.mask.shape, generator=torch.Generator().manual_seed(0)) + 0.5
    padded = forward_and_grads(Policy(model, logps_chunk_size=16), batch, weights)
    query_lengths = []  # the decoder's attention runs row by row (packing.row_attention): one SDPA per row
    monkeypatch.setattr(packing, "sdpa_attention_forward", lambda m, q, *a, **k: query_lengths.append(q.shape[2]) or sdpa(m, q, *a, **k))
    packed = forward_and_grads(Policy(model, logps_chunk_size=16, padding_free=True), batch, weights)
    assert set(lengths.tolist()) <= set(query_lengths)
    counted = batch.mask.bool()
    assert (padded[0][counted] < 0).all()  # real log-probs, not the zeros of skipped positions
    assert_close(packed[0][counted], padded[0][counted], atol=1e-5, rtol=1e-5)
    assert (packed[0][~counted] == 0).all()
    assert_close(packed[1], padded[1], atol=1e-5, rtol=1e-5)
    assert packed[2].keys() == padded[2].keys()
    for param, grad in padded[2].items():
        assert_close(packed[2][param], grad, atol=1e-5, rtol=1e-5, msg=lambda m, param=param: f"{param}: {m}")


@pytest.mark.parametrize("name", family_params(("tiny", "tiny-llava", "tiny-qwen3-vl")))
def test_shifted_row_positions_are_caught(name, load_family, make_image, monkeypatch):
    # The exactness check is sharp: move the middle row's positions after its first token one further
    # (M-RoPE: t/h/w rows too) and its log-probs change, while the other rows' stay the same.
    processor, model, stop_ids = load_family(name)
    rows, images = conversations(make_image, 1)
    batch = encode_conversations(processor, rows, images, ["a", "b", "c"], max_length=1024, stop_ids=stop_ids)
    policy = Policy(model, logps_chunk_size=16, padding_free=True)
    with torch.no_grad():
        right = policy(**batch.model_inputs(), logps_mask=batch.mask)[0]
        own = packing.row_positions

        def shifted(*args):
            positions = own(*args).clone()
            positions[..., 1, 1:] += 1  # row 1, every token after the first
            return positions

        monkeypatch.setattr(packing, "row_positions", shifted)
        wrong = policy(**batch.model_inputs(), logps_mask=batch.mask)[0]
    counted = batch.mask.bool()
    assert_close(wrong[0][counted[0]], right[0][counted[0]], atol=1e-5, rtol=1e-5)
    assert_close(wrong[2][counted[2]], right[2][counted[2]], atol=1e-5, rtol=1e-5)
    assert (wrong[1][counted[1]] - right[1][counted[1]]).abs().max() > 1e-3


def test_linear_attention_family_is_refused(load_family, tmp_path):
    _, model, _ = load_family("tiny-qwen3.5")
    with pytest.raises(ValueError, match="linear_attention.*--padding-free"):
        packing.check_packable(model)
    packing.check_packable(load_family("tiny")[1])  # full attention: accepted


# ALGO:BATCH:ACCUM, :pf padding-free, then a token budget (tests/parity_worker.py). The parity samples' rows
# are 48, 52, 66 and 99 tokens (pairs: 48+66, 52+67, 66+66, 99+69); rank 0 takes the first two.
PARITY_SPECS = ("sft:1:2:pf", "sft:2:1:pf", "dpo:1:2:pf", "mpo:1:2:pf", "sft:2:1:pf:120", "dpo:2:1:pf:250", "mpo:2:1::250")


@pytest.fixture(scope="module")
def two_ranks_padding_free(tiny_dirs, tmp_path_factory):
    """2 FSDP ranks (torchrun, gloo), padding-free: each spec's step on the 4 parity samples."""
    return parity_on_two_ranks(str(tiny_dirs["tiny"]), tmp_path_factory.mktemp("padding_free"), PARITY_SPECS, timeout=600)


@pytest.mark.parametrize("spec, reference", [("sft:1:2:pf", "sft:4:1"), ("sft:2:1:pf", "sft:4:1"), ("dpo:1:2:pf", "dpo:4:1"),
                                             ("mpo:1:2:pf", "mpo:4:1"), ("sft:2:1:pf:120", "sft:4:1"),
                                             ("dpo:2:1:pf:250", "dpo:4:1"), ("mpo:2:1::250", "mpo:4:1")])  # fmt: skip
def test_two_ranks_padding_free_match_one_process_padded(spec, reference, two_ranks_padding_free, one_process):
    # The step of train.py's normalisation rule (global counts) on 2 ranks x micro-batches, padding-free,
    # == 1 process x 1 padded micro-batch: loss, count and every parameter's gradient. DPO/MPO: chosen
    # and rejected rows of a pair are packed into one sequence, and their sums still pair up.
    assert_same_step(two_ranks_padding_free[spec], one_process[reference])


OTHER_PACKABLE = tuple(n for n in PACKABLE if n != "tiny")


@pytest.fixture(scope="module")
def families_two_ranks_padding_free(tmp_path_factory):
    """sft:1:2:pf (2 ranks x 2 micro-batches, padding-free) for every other packable family, one launch."""
    dirs = {name: str(ensure_tiny(name)) for name in OTHER_PACKABLE}
    out = tmp_path_factory.mktemp("padding_free_families") / "two_ranks.pt"
    proc = torchrun(str(TESTS / "families_worker.py"), str(out), "sft:1:2:pf", *dirs.values(), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {name: result for name, result in zip(dirs, torch.load(out).values())}


@pytest.mark.parametrize("name", family_params(OTHER_PACKABLE))
def test_every_family_two_ranks_padding_free_match_one_process_padded(name, families_two_ranks_padding_free, dist_world):
    # As above, family by family: M-RoPE (Qwen2-VL, Qwen3-VL with deepstack), token_type_ids (Gemma 3),
    # Gemma 4, tiles (SmolVLM), LLaVA. Some parameters get no gradient from these samples in some
    # families (test_families.py checks the vision tower and lm_head), so zero gradients are not refused.
    reference = parity_step(str(ensure_tiny(name)), "sft", 4, 1)
    assert_same_step(families_two_ranks_padding_free[name], reference, every_gradient_nonzero=False)


@pytest.mark.parametrize("spec, rows_per_rank", [("sft:2:1:pf:120", [[1, 1], [1, 1]]), ("dpo:2:1:pf:250", [[2, 2], [2, 2]]),
                                                   ("mpo:2:1::250", [[2, 2], [2, 2]])])  # fmt: skip
def test_token_budget_micro_batch_count_is_agreed_by_the_ranks(spec, rows_per_rank, two_ranks_padding_free):
    # Rank 1's budget needs 2 micro-batches where rank 0's needs 1 (sft: 48 + 52 = 100 <= 120 < 66 + 99;
    # dpo packed: pairs of 114 and 119 = 233 <= 250 < 132 + 168): both ranks run 2, rank 0 splitting its
    # one. Padded (mpo), the budget counts rows x the longest row: 4 x 67 > 250 already on rank 0.
    # Rows per micro-batch, rank by rank (a DPO pair is 2 rows).
    assert two_ranks_padding_free[spec]["rows_per_rank"] == rows_per_rank


def test_budget_groups_hand_values():
    # Padding-free the cost is the sum: 6 + 1 + 1 = 8 fits a budget of 8 in one group; padded it is
    # rows x longest: 2 x 6 = 12 > 8, so the 6 goes alone and 2 x 1 = 2 follows.
    assert packing.budget_groups([[6], [1], [1]], 8, padding_free=True) == [slice(0, 3)]
    assert packing.budget_groups([[6], [1], [1]], 8, padding_free=False) == [slice(0, 1), slice(1, 3)]
    # A sample over the budget goes alone; the next group starts after it.
    assert packing.budget_groups([[2], [20], [3], [4]], 8, padding_free=True) == [slice(0, 1), slice(1, 2), slice(2, 4)]
    # Asked for more groups (another rank needs them): the largest group of 2+ samples is halved.
    assert packing.budget_groups([[6], [1], [1]], 8, padding_free=True, num_groups=2) == [slice(0, 1), slice(1, 3)]
    assert packing.budget_groups([[6], [1], [1]], 8, padding_free=True, num_groups=3) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    # Pairs: a sample's two rows count together (4 + 5 = 9 <= 10; with 1 + 1 more, 11 > 10).
    assert packing.budget_groups([[4, 5], [1, 1]], 10, padding_free=True) == [slice(0, 1), slice(1, 2)]


RL_MODULES = {"grpo": grpo, "gspo": grpo, "rloo": rloo, "online_dpo": online_dpo}


@pytest.mark.parametrize("shared", [False, True], ids=["whole_rows", "shared_prompts"])
@pytest.mark.parametrize("algo", RL_MODULES)
def test_rl_step_padding_free_equals_padded(algo, shared, tiny_dirs, dist_world, monkeypatch):
    # One optimizer step (2 micro-batches: accumulation) of each RL loss through prepare and loss, old and
    # reference (beta > 0) log-probs included, padded vs padding-free: loss and every gradient. Completions of
    # different lengths, so the rows are padded differently. Rollouts without shared prompts (vLLM's,
    # HF generate's) are packed; with them (nanoalign's sampler) the shared-prompt forward wins: it must
    # then be the one that runs, packed_hidden never called.
    module = RL_MODULES[algo]

    class WholeRows(FixedRollouts):  # as vLLM's or HF generate's rollouts come: no shared prompts
        def rollout(self, chunk, n):
            return dataclasses.replace(super().rollout(chunk, n), shared_prompts={})

    if shared:
        monkeypatch.setattr("nanoalign.model.packed_hidden", lambda *a: pytest.fail("the shared-prompt forward should win"))
    G = 2 if algo in ("rloo", "online_dpo") else 4
    cfg = dataclasses.replace(PRESETS[algo](), num_generations=G, max_length=512, batch_size=2 * G, grad_accum_steps=2,
                              steps_per_generation=1, beta=0.04, reward_funcs=("toy_rewards:shorter",), reward_weights=(1.0,))  # fmt: skip
    check_config(cfg)
    samples = [prepare_sample(shapes_sample("train", i, "rl"), "rl", f"sample {i}") | {"index": i} for i in range(4)]
    backend = FixedRollouts if shared else WholeRows
    loss_padded, grads_padded = one_step(module, str(tiny_dirs["tiny"]), cfg, samples, backend)
    loss_packed, grads_packed = one_step(module, str(tiny_dirs["tiny"]), dataclasses.replace(cfg, padding_free=True), samples, backend)
    assert sum(float(g.abs().sum()) for g in grads_padded.values()) > 0  # a real signal to compare
    assert loss_packed == pytest.approx(loss_padded, rel=1e-5, abs=1e-6)
    assert grads_packed.keys() == grads_padded.keys()
    for name, grad in grads_padded.items():
        assert_close(grads_packed[name], grad, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("algo", ["sft", "dpo"])
def test_train_loop_padding_free_with_a_token_budget_logs_the_padded_losses(algo, tiny_dirs, dist_world, tmp_path):
    # train.train end to end, 3 steps of 4 samples: padded, 1 micro-batch of 4 vs padding-free with a
    # budget of 1 token (every sample alone: 4 micro-batches a step, more than --grad-accum-steps 2, so
    # the loop must take a step's micro-batches however many there are). Same losses, step by step.
    common = {"model": "tiny", "max-steps": 3, "num-shapes-samples": 64, "logps-chunk-size": 64}
    run_train(tmp_path / "padded", algo, **common, **{"batch-size": 4})
    run_train(tmp_path / "packed", algo, "--padding-free", **common,
              **{"batch-size": 2, "grad-accum-steps": 2, "max-tokens-per-micro-batch": 1})  # fmt: skip
    padded, packed = steps(tmp_path / "padded"), steps(tmp_path / "packed")
    assert [r["step"] for r in packed] == [1, 2, 3]
    for a, b in zip(padded, packed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_flags_are_checked():
    with pytest.raises(ValueError, match="--max-tokens-per-micro-batch does nothing for --algo grpo"):
        check_config(dataclasses.replace(PRESETS["grpo"](), max_tokens_per_micro_batch=4096))
    with pytest.raises(ValueError, match="--max-tokens-per-micro-batch must be >= 0"):
        check_config(Config(max_tokens_per_micro_batch=-1))
