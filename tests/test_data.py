"""Tests for nanoalign/data.py: bad samples fail loudly with their name, skipping is deterministic,
local datasets load with column renames, and the sample order is resumable."""

import json
import math
import re
from pathlib import Path

import pytest
from conftest import REPO, torchrun  # noqa: E402
from PIL import Image
from test_algorithms import run_train, save_image, steps, write_jsonl  # noqa: E402

import train as train_module  # noqa: E402
from nanoalign.checkpoint import latest_checkpoint
from nanoalign.data import (
    BadSampleError,
    accuracy_prompts,
    fetch_samples,
    load_split,
    prepare_sample,
    stream_indices,
)
from nanoalign.metrics import read_metrics
from nanoalign.shapes import make_example


def user(text="How many shapes?", num_images=1):
    return {"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}


def assistant(text="There are 2."):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


@pytest.fixture
def image_path(tmp_path, make_image):
    path = tmp_path / "good.png"
    make_image(0).save(path)
    return path


def good(image_path, answer="There are 2."):
    return {"messages": [user(), assistant(answer)], "images": [str(image_path)]}


# -----------------------------------------------------------------------------
# bad samples: each raises BadSampleError naming the sample


def test_corrupt_image_names_sample(tmp_path, image_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png at all" * 3)  # PNG magic, garbage after
    data = [good(image_path), {"messages": [user(), assistant()], "images": [str(corrupt)]}]
    with pytest.raises(BadSampleError) as err:
        fetch_samples(data, [0, 1], "sft", "train", skip_bad=False)
    assert "sample 1 of split 'train'" in str(err.value)
    assert "corrupt.png" in str(err.value) and "--skip-bad-samples" in str(err.value)


def test_missing_image_names_sample(tmp_path):
    missing = tmp_path / "nowhere" / "missing.png"
    with pytest.raises(BadSampleError, match=r"^row-7: image 0 .*missing\.png.*cannot be read"):
        prepare_sample({"messages": [user(), assistant()], "images": [str(missing)]}, "sft", "row-7")


def test_truncated_image_file_is_caught_at_decode(tmp_path, image_path):
    # A file whose header is fine but whose data is cut: PIL's lazy open would accept it; load() must not.
    cut = tmp_path / "cut.png"
    cut.write_bytes(image_path.read_bytes()[:200])
    with pytest.raises(BadSampleError, match="row-3"):
        prepare_sample({"messages": [user(), assistant()], "images": [str(cut)]}, "sft", "row-3")


@pytest.mark.parametrize(
    "messages, reason",
    [
        ([], "empty conversation"),
        ([user()], "no assistant turn"),
        ([user(), assistant("   ")], "no assistant turn"),  # whitespace only: nothing to learn
        ([assistant()], "no user turn"),
        (["hello", "world"], "must be a string or a list"),  # not {role, content} dicts
    ],
)
def test_malformed_conversation_names_sample(messages, reason, image_path):
    images = [str(image_path)] if any(isinstance(m, dict) and m["role"] == "user" for m in messages) else []
    with pytest.raises(BadSampleError) as err:
        prepare_sample({"messages": messages, "images": images}, "sft", "sample 5 of split 'train'")
    assert str(err.value).startswith("sample 5 of split 'train': ")
    assert reason in str(err.value)


def test_placeholder_count_mismatch_names_sample(image_path):
    # Two placeholders for one image: which image goes where is ambiguous, so refuse.
    with pytest.raises(BadSampleError, match=r"row-1: the messages hold 2 image placeholders but the sample has 1"):
        prepare_sample({"messages": [user(num_images=2), assistant()], "images": [str(image_path)]}, "sft", "row-1")


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(rejected=[assistant("There are 2.")]), "'chosen' and 'rejected' are identical"),
        (dict(chosen=[assistant("  ")]), "'chosen' must end with a non-empty assistant turn"),  # empty completion
        (dict(rejected=[]), "'rejected' must end with a non-empty assistant turn"),
        (dict(images=[]), "the messages hold 1 image placeholders but the sample has 0 images"),  # prompt refers to one
    ],
)
def test_bad_preference_pair_names_sample(change, reason, image_path):
    pair = {"prompt": [user()], "chosen": [assistant("There are 2.")], "rejected": [assistant("There are 3.")],
            "images": [str(image_path)]}  # fmt: skip
    assert prepare_sample(pair, "preference", "pair-4")["chosen"] == pair["chosen"]  # the pair itself is fine
    with pytest.raises(BadSampleError) as err:
        prepare_sample({**pair, **change}, "preference", "pair-4")
    assert str(err.value).startswith("pair-4: ") and reason in str(err.value)


# -----------------------------------------------------------------------------
# skipping and order


def test_skip_bad_replaces_with_next_good_deterministically(tmp_path, image_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"garbage")
    bad = {"messages": [user(), assistant()], "images": [str(corrupt)]}
    data = [good(image_path, "zero"), bad, bad, good(image_path, "three"), good(image_path, "four")]
    # index 1 is bad, so is 2: replaced by the next good one, 3. Index 4 is fine. Two samples tried and skipped.
    samples, num_skipped = fetch_samples(data, [1, 4], "sft", "train", skip_bad=True)
    assert [s["sample_id"] for s in samples] == ["sample 3 of split 'train'", "sample 4 of split 'train'"]
    assert [s["messages"][-1]["content"][0]["text"] for s in samples] == ["three", "four"]
    assert num_skipped == 2
    # Same call, same answer (a resumed run must get the same replacement).
    again, again_skipped = fetch_samples(data, [1, 4], "sft", "train", skip_bad=True)
    assert [s["sample_id"] for s in again] == [s["sample_id"] for s in samples] and again_skipped == 2
    # Wrap-around: after the last index comes index 0.
    data_end_bad = [good(image_path, "zero"), bad]
    samples, num_skipped = fetch_samples(data_end_bad, [1], "sft", "train", skip_bad=True)
    assert samples[0]["sample_id"] == "sample 0 of split 'train'" and num_skipped == 1
    # Without skip_bad the first bad sample stops everything, naming itself.
    with pytest.raises(BadSampleError, match="sample 1 of split 'train'"):
        fetch_samples(data, [1, 4], "sft", "train", skip_bad=False)
    # Nothing usable at all: an error, not an endless loop.
    with pytest.raises(BadSampleError, match="no usable sample"):
        fetch_samples([bad, bad], [0], "sft", "train", skip_bad=True)


def test_stream_indices_are_resumable_epoch_permutations():
    n = 7
    stream = stream_indices(0, 3 * n, n, seed=5)
    for epoch in range(3):  # every epoch visits every sample exactly once
        assert sorted(stream[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert stream[:n] != stream[n : 2 * n] or stream[n : 2 * n] != stream[2 * n :]  # epochs reshuffle
    # Any window equals the same slice of the whole stream: resuming needs only the position.
    assert stream_indices(5, 11, n, seed=5) == stream[5:16]
    assert stream_indices(0, n, n, seed=6) != stream[:n]  # the seed matters


# -----------------------------------------------------------------------------
# local datasets


def test_local_jsonl_with_column_renames(tmp_path, make_image):
    # A local jsonl whose columns are called "conversation" and "pictures" instead of messages/images.
    rows = []
    for i, size in enumerate([(112, 112), (168, 84)]):
        path = tmp_path / f"img{i}.png"
        make_image(i, size).save(path)
        conversation = [user(f"question {i}"), assistant(f"answer {i}")]
        rows.append({"conversation": conversation, "pictures": [str(path)], "extra": i})
    data_file = tmp_path / "train.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))

    ds = load_split(str(data_file), "train", "sft", 0, ("messages=conversation", "images=pictures"))
    assert len(ds) == 2 and {"messages", "images"} <= set(ds.column_names)
    samples, num_skipped = fetch_samples(ds, [1, 0], "sft", "train", skip_bad=False)
    assert num_skipped == 0
    assert [s["sample_id"] for s in samples] == ["sample 1 of split 'train'", "sample 0 of split 'train'"]
    assert [im.size for s in samples for im in s["images"]] == [(168, 84), (112, 112)]
    assert all(im.mode == "RGB" and isinstance(im, Image.Image) for s in samples for im in s["images"])
    first = samples[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"]
    assert first[0]["content"][0]["type"] == "image" and first[0]["content"][1]["text"] == "question 1"
    assert first[1]["content"][0]["text"] == "answer 1"

    # Without the rename the required column is missing: the error says which flag fixes it.
    with pytest.raises(ValueError, match="--columns"):
        load_split(str(data_file), "train", "sft", 0)
    with pytest.raises(ValueError, match="--columns 'messages=nope'"):
        load_split(str(data_file), "train", "sft", 0, ("messages=nope",))


def test_placeholders_inserted_when_messages_have_none(tmp_path, make_image):
    # TRL convention: a sample with images but no {"type": "image"} entry gets them in front of the
    # first user turn. String contents (as plain-text datasets have them) are converted.
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"p{i}.png")
        make_image(i).save(paths[-1])
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "How many shapes in total?"},
            {"role": "assistant", "content": "3"},
        ],
        "images": [str(p) for p in paths],
    }
    data_file = tmp_path / "plain.jsonl"
    data_file.write_text(json.dumps(row) + "\n")
    ds = load_split(str(data_file), "train", "sft", 0)
    (sample,), _ = fetch_samples(ds, [0], "sft", "train", skip_bad=False)
    messages = sample["messages"]
    assert messages[0] == {"role": "system", "content": "Be brief."}  # untouched: not a user turn
    assert messages[1]["content"] == [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "How many shapes in total?"}
    ]  # fmt: skip
    assert messages[2] == {"role": "assistant", "content": "3"}
    assert len(sample["images"]) == 2
    # Preparing an in-memory row does not modify it (a map-style dataset may hand out the same dict
    # again, which would then get a second set of placeholders and fail the count check).
    direct = prepare_sample(row, "sft", "row-0")
    assert direct["messages"] == messages
    assert row["messages"][1]["content"] == "How many shapes in total?"
    assert prepare_sample(row, "sft", "row-0")["messages"] == messages


def test_prompt_completion_columns_and_single_image_column(image_path):
    # sft data may come as prompt + completion strings, with one image in an "image" column.
    sample = prepare_sample({"prompt": "How many?", "completion": "Two.", "image": str(image_path)}, "sft", "s")
    assert [m["role"] for m in sample["messages"]] == ["user", "assistant"]
    assert sample["messages"][0]["content"] == [{"type": "image"}, {"type": "text", "text": "How many?"}]
    assert len(sample["images"]) == 1


def test_parquet_with_image_features_decodes_lazily_and_names_corrupt_rows(tmp_path, make_image):
    # Hub-style data: images stored as bytes in an Image feature. load_split turns decoding off so
    # that a corrupt image fails in decode_image, with its sample's name, not deep inside datasets.
    import datasets

    good_image = make_image(0, (84, 56))
    rows = [{"messages": [user(), assistant(str(i))], "images": [good_image]} for i in range(3)]
    rows[1]["images"] = [{"bytes": b"not an image", "path": None}]
    features = datasets.Features({
        "messages": [{"role": datasets.Value("string"), "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        "images": datasets.List(datasets.Image()),
    })  # fmt: skip
    path = tmp_path / "data.parquet"
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))

    ds = load_split(str(path), "train", "sft", 0)
    assert ds.features["images"].feature.decode is False
    samples, num_skipped = fetch_samples(ds, [0, 2], "sft", "train", skip_bad=False)
    assert [im.size for s in samples for im in s["images"]] == [(84, 56), (84, 56)] and num_skipped == 0
    with pytest.raises(BadSampleError, match=r"^sample 1 of split 'train': image 0 .*cannot be read"):
        fetch_samples(ds, [1], "sft", "train", skip_bad=False)
    samples, num_skipped = fetch_samples(ds, [1], "sft", "train", skip_bad=True)
    assert samples[0]["sample_id"] == "sample 2 of split 'train'" and num_skipped == 1


def test_a_solution_column_makes_any_format_an_accuracy_eval(image_path):
    # The held-out accuracy eval reads `solution` in every format: an SFT conversation is answered
    # from the turns before its last assistant turn; samples without a gold answer are left out.
    sft = prepare_sample({**good(image_path), "solution": "$2$"}, "sft", "sample 0")
    plain = prepare_sample(good(image_path), "sft", "sample 1")
    pair = prepare_sample({"prompt": [user()], "chosen": [assistant()], "rejected": [assistant("There are 3.")],
                           "images": [str(image_path)], "solution": "$2$"}, "preference", "sample 2")  # fmt: skip
    prompts = accuracy_prompts([sft, plain, pair])
    assert [p["sample_id"] for p in prompts] == ["sample 0", "sample 2"]
    assert prompts[0]["prompt"] == sft["messages"][:1] and prompts[0]["prompt"][0]["role"] == "user"
    assert prompts[1]["prompt"] == pair["prompt"] and all(p["solution"] == "$2$" and len(p["images"]) == 1 for p in prompts)


def test_the_built_in_task_has_gold_answers_in_every_format():
    # what lets an SFT / DPO / MPO run on it report held-out accuracy without knowing its name
    samples = [prepare_sample(load_split("shapes", "eval", fmt, 4)[0], fmt, "s") for fmt in ("sft", "preference", "rl")]
    prompts = accuracy_prompts(samples)
    assert len(prompts) == 3 and len({json.dumps(p["prompt"]) for p in prompts}) == 1  # the same question
    assert len({p["solution"] for p in prompts}) == 1


def test_an_empty_data_file_is_named(tmp_path):
    # was: a bare StopIteration (jsonl) and "An error occurred while generating the dataset" (parquet)
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "empty.jsonl").touch()
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "train.jsonl").write_text(json.dumps({"prompt": "How many?"}) + "\n")
    (tmp_path / "dir" / "eval.jsonl").touch()
    for dataset, file in (("empty.jsonl", "empty.jsonl"), ("empty.parquet", "empty.parquet"), ("dir", "dir/eval.jsonl")):
        with pytest.raises(ValueError, match=f"{tmp_path / file} has no rows"):
            load_split(str(tmp_path / dataset), "train", "rl", 0)


# -----------------------------------------------------------------------------
# bad input on 2 ranks: an over-long RL prompt, a bad held-out image


@pytest.fixture(scope="module")
def rl_data(tmp_path_factory) -> Path:
    """An RL dataset (data/train.jsonl, data/eval.jsonl) of shapes questions with gold answers, in which
    the prompt rank 1 draws at step 2 is far longer than --max-length 120; eval row 5 (rank 1's share)
    has an unreadable image, in data_bad_eval/."""
    root = tmp_path_factory.mktemp("rl_data")
    num_train, per_rank = 32, 2  # --batch-size 8, G 4: 2 prompts per rank per step
    step2_rank1 = train_module.stream_indices(3 * per_rank, 1, num_train, 0)[0]  # stream position 6
    for split, shapes_split, num in (("train", "train", num_train), ("eval", "eval", 8)):
        rows = []
        for i in range(num):
            ex = make_example(shapes_split, i)
            question = ex["question"] + (" Think of every shape there is, one by one." * 40 if split == "train" and i == step2_rank1 else "")
            rows.append({"prompt": question, "images": [save_image(ex["images"][0], root, f"{split}_{i}")], "solution": str(ex["answer"])})
        write_jsonl(root / "data" / f"{split}.jsonl", rows)
        if split == "eval":
            (root / "bad.png").write_bytes(b"not a png")
            rows[5]["images"] = [str(root / "bad.png")]
            write_jsonl(root / "data_bad_eval" / "eval.jsonl", rows)
            (root / "data_bad_eval" / "train.jsonl").write_text((root / "data" / "train.jsonl").read_text())
    return root


def rl_argv(warm_model, data, out, *extra) -> list[str]:
    return [str(REPO / "train.py"), "--algo", "grpo", "--model", warm_model, "--dataset", str(data), "--out-dir", str(out),
            "--batch-size", "8", "--num-generations", "4", "--max-completion-length", "8", "--max-length", "120",
            "--warmup-steps", "1", "--save-every", "1", "--no-export", "--eval-every", "0", "--num-eval-samples", "4",
            "--reward-funcs", "toy_rewards:shorter", "--reward-weights", "1.0", *extra]  # fmt: skip


def test_overlong_rl_prompt_stops_both_ranks_then_is_skipped(warm_model, rl_data, tmp_path):
    proc = torchrun(*rl_argv(warm_model, rl_data / "data", tmp_path, "--max-steps", "3"))
    assert proc.returncode != 0
    assert re.search(r"sample \d+ of split 'train': the prompt is \d+ tokens long .*--skip-bad-samples", proc.stderr), proc.stderr[-3000:]
    assert "other rank(s) failed" in proc.stderr  # rank 0 stopped with it, not in a gloo error
    assert latest_checkpoint(tmp_path).name == "step_000001"  # step 1 is kept; nothing is lost
    assert [r["step"] for r in steps(tmp_path)] == [1]

    proc = torchrun(*rl_argv(warm_model, rl_data / "data", tmp_path, "--max-steps", "3", "--skip-bad-samples"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    records = steps(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]  # resumed after step 1
    assert records[1]["skipped_samples"] == 1  # one prompt skipped on one of the 2 ranks: a count, summed (was 0.5)
    assert all(math.isfinite(r["loss"]) and "truncated_rows" in r for r in records)


def test_bad_held_out_image_stops_both_ranks_naming_it(warm_model, rl_data, tmp_path):
    proc = torchrun(*rl_argv(warm_model, rl_data / "data_bad_eval", tmp_path, "--max-steps", "1", "--num-eval-samples", "8"))
    assert proc.returncode != 0
    assert "sample 5 of split 'eval': image 0" in proc.stderr and "cannot be read" in proc.stderr, proc.stderr[-3000:]
    assert "other rank(s) failed" in proc.stderr
    # --skip-bad-samples skips it, and the evaluation counts the skip
    proc = torchrun(*rl_argv(warm_model, rl_data / "data_bad_eval", tmp_path, "--max-steps", "0", "--num-eval-samples", "8",
                             "--skip-bad-samples"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (evaluation,) = read_metrics(tmp_path / "metrics.jsonl")
    assert evaluation["eval/skipped_samples"] == 1
    # --max-steps 0 only evaluates: that evaluation is the start and the end of the summary (was "end nan")
    accuracy = evaluation["eval/accuracy"]
    assert f"eval accuracy: start {accuracy:.3f} -> end {accuracy:.3f}" in proc.stdout, proc.stdout[-2000:]


def test_bad_held_out_sft_sample_stops_both_ranks_naming_it(tmp_path):
    # eval row 3 (rank 1's share of 4) puts its image after 300 words: its image tokens lie past
    # --max-length, found when the evaluation builds its batch (was: rank 1 alone raised, rank 0 hung
    # in the eval all-reduce until gloo dropped the connection)
    for split, num in (("train", 8), ("eval", 4)):
        rows = []
        for i in range(num):
            ex, bad = make_example(split, i), split == "eval" and i == 3
            text = {"type": "text", "text": ex["question"] + (" word" * 300 if bad else "")}
            user = [text, {"type": "image"}] if bad else [{"type": "image"}, text]
            answer = [{"type": "text", "text": str(ex["answer"])}]
            rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                         "images": [save_image(ex["images"][0], tmp_path, f"{split}_{i}")]})  # fmt: skip
        write_jsonl(tmp_path / "data" / f"{split}.jsonl", rows)
    proc = torchrun(str(REPO / "train.py"), "--model", "tiny", "--dataset", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out"),
                    "--max-steps", "1", "--batch-size", "2", "--max-length", "200", "--num-eval-samples", "4", "--no-export")  # fmt: skip
    assert proc.returncode != 0
    assert "sample 3 of split 'eval'" in proc.stderr and "image tokens lie past --max-length 200" in proc.stderr, proc.stderr[-3000:]
    assert "other rank(s) failed" in proc.stderr and "Connection closed" not in proc.stderr


# -----------------------------------------------------------------------------
# held-out data, single files, column renames


def test_held_out_split_is_held_out(tmp_path):
    rows = [{"prompt": f"question {i}", "solution": str(i)} for i in range(6)]
    single = write_jsonl(tmp_path / "one.jsonl", rows)
    assert len(load_split(str(single), "train", "rl", 0)) == 6
    assert load_split(str(single), "eval", "rl", 0, held_out=True) is None  # never its training rows
    write_jsonl(tmp_path / "dir" / "train.jsonl", rows[:4])
    write_jsonl(tmp_path / "dir" / "eval.jsonl", rows[4:])  # `datasets` calls this split "test"
    held_out = load_split(str(tmp_path / "dir"), "eval", "rl", 0, held_out=True)
    assert [r["prompt"] for r in held_out] == ["question 4", "question 5"]
    with pytest.raises(ValueError, match="no split 'training'"):
        load_split(str(tmp_path / "dir"), "training", "rl", 0)


@pytest.mark.usefixtures("single_thread")  # in-process training: one OpenMP thread (conftest.one_thread)
def test_a_single_data_file_trains_without_evaluation(warm_model, tmp_path, capsys):
    rows = [{"prompt": make_example("train", i)["question"], "solution": "3"} for i in range(8)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    run_train(tmp_path / "out", "grpo", "--model", warm_model, "--dataset", str(data), "--max-steps", "1",
              "--batch-size", "4", "--num-generations", "4", "--max-completion-length", "4",
              **{"eval-split": "eval", "num-eval-samples": 4, "no-export": False})  # fmt: skip
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1] and not any(k.startswith("eval/") for k in records[0])
    # where the model went is said without an accuracy eval too (the one line a user needs from stdout)
    assert f"exported model ({tmp_path / 'out' / 'final'})" in capsys.readouterr().out


def test_column_rename_onto_an_existing_column_says_what_to_do(tmp_path):
    rows = [{"prompt": "old", "problem": "new", "solution": "1"}]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(ValueError, match=r"already has a column 'prompt'.*prompt=problem original_prompt=prompt"):
        load_split(str(data), "train", "rl", 0, ("prompt=problem",))
    ds = load_split(str(data), "train", "rl", 0, ("prompt=problem", "original_prompt=prompt"))
    assert ds[0]["prompt"] == "new" and ds[0]["original_prompt"] == "old"
