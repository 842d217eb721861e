"""Compare models side by side: what each answers to the same held-out images and questions.

    python -m nanoalign.compare tiny-sft runs/grpo/final runs/gspo/final --num-samples 8 --out compare.html
    python -m nanoalign.compare Qwen/Qwen2.5-VL-3B-Instruct runs/qwen3b-sft/final --dataset DIR --num-samples 20

For the first --num-samples held-out samples with a gold `solution`: the image, the question, the gold
answer and each model's greedy answer marked right or wrong, each model's accuracy on top; one
self-contained HTML file (images inlined) and a markdown table beside it (.md), also printed. A model is
a checkpoint directory (e.g. a run's `final` export), a hub id or a built-in name ("tiny-sft" once built);
they load one at a time and answer through training's own held-out eval (rewards.accuracy).
"""

import argparse
import base64
import html
import io
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from nanoalign.config import Config
from nanoalign.data import accuracy_prompts, fetch_samples, load_split, message_text
from nanoalign.model import load_processor, stop_and_pad_ids
from nanoalign.rewards import accuracy
from nanoalign.tiny import BUILDERS, ensure_tiny, warm_start_configs


def model_dir(model: str) -> str:
    """A built-in name as its cached directory (built on first use, but tiny-sft, which takes training); else as given."""
    if model == "tiny-sft":
        path = Path(warm_start_configs()[-1].out_dir) / "final"
        if not (path / "config.json").exists():
            raise ValueError("tiny-sft is not built yet: run a demo that starts from it once (e.g. `python train.py "
                             "--algo grpo --max-steps 0`), or pass a checkpoint directory")  # fmt: skip
        return str(path)
    return str(ensure_tiny(model)) if model in BUILDERS else model


def held_out_prompts(dataset: str, split: str, fmt: str, num_samples: int, columns: tuple[str, ...]) -> list[dict]:
    """The first num_samples samples of the held-out split, as prompts with a gold `solution`."""
    data = load_split(dataset, split, fmt, num_samples, columns, held_out=True)
    if data is None:
        raise ValueError(f"--dataset {dataset} has no held-out split {split!r}; name one with --eval-split")
    samples, _ = fetch_samples(data, list(range(min(num_samples, len(data)))), fmt, split, skip_bad=False)
    prompts = accuracy_prompts(samples)
    if not prompts:
        raise ValueError(f"--dataset {dataset} [{split}] has no `solution` column (the gold answer); rename yours with --columns")
    return prompts


def answer_all(models: list[str], prompts: list[dict], max_new_tokens: int) -> dict[str, list[tuple[str, bool]]]:
    """Each model's (greedy answer, right) for every prompt, loading one model at a time."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    answers = {}
    for model in models:
        path = model_dir(model)
        hf_model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).to(device).eval()
        processor = load_processor(path)
        stop_ids, pad_id = stop_and_pad_ids(processor, hf_model)
        *_, answers[model] = accuracy(hf_model, processor, prompts, batch_size=16, max_new_tokens=max_new_tokens,
                                      stop_ids=stop_ids, pad_id=pad_id, device=device)  # fmt: skip
        del hf_model  # before the next one loads
        print(f"{model}: accuracy {sum(right for _, right in answers[model]) / len(prompts):.3f}", flush=True)
    return answers


def markdown_table(prompts: list[dict], answers: dict[str, list[tuple[str, bool]]]) -> str:
    def cell(text) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| # | question | gold | " + " | ".join(map(cell, answers)) + " |", "|---" * (3 + len(answers)) + "|"]
    lines.append("| | accuracy | | " + " | ".join(f"**{accuracy_of(a):.2f}**" for a in answers.values()) + " |")
    for i, p in enumerate(prompts):
        marked = [f"{'✓' if right else '✗'} {cell(text)}" for text, right in (a[i] for a in answers.values())]
        lines.append(f"| {i} | {cell(message_text(p['prompt'][-1]))} | {cell(p['solution'])} | " + " | ".join(marked) + " |")
    return "\n".join(lines) + "\n"


def html_page(prompts: list[dict], answers: dict[str, list[tuple[str, bool]]]) -> str:
    def image(p) -> str:
        if not p["images"]:
            return ""
        buffer = io.BytesIO()
        p["images"][0].save(buffer, format="PNG")
        return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'

    head = "".join(f"<th>{html.escape(m)}<br>accuracy {accuracy_of(a):.2f}</th>" for m, a in answers.items())
    rows = "".join(
        f'<tr class="sample"><td>{i}</td><td>{image(p)}</td><td>{html.escape(message_text(p["prompt"][-1]))}</td>'
        f"<td>{html.escape(str(p['solution']))}</td>"
        + "".join(f'<td class="{"right" if right else "wrong"}">{html.escape(text)}</td>' for text, right in (a[i] for a in answers.values()))
        + "</tr>\n"
        for i, p in enumerate(prompts)
    )  # fmt: skip
    style = ("body{font-family:sans-serif} table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:4px;"
             "vertical-align:top;max-width:22em} img{width:112px} .right{background:#dfd} .wrong{background:#fdd}")  # fmt: skip
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>nanoalign compare</title><style>{style}</style>"
            f"</head><body><table><tr><th>#</th><th>image</th><th>question</th><th>gold</th>{head}</tr>\n{rows}</table>"
            "</body></html>\n")  # fmt: skip


def accuracy_of(answers: list[tuple[str, bool]]) -> float:
    return sum(right for _, right in answers) / len(answers)


def main(argv: list[str] | None = None) -> dict[str, list[tuple[str, bool]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="checkpoint directories, hub ids or built-in names")
    parser.add_argument("--dataset", default=Config.dataset, help="as train.py's --dataset (default: the built-in shapes)")
    parser.add_argument("--eval-split", default=Config.eval_split, help="the held-out split")
    parser.add_argument("--format", default="rl", choices=["sft", "preference", "rl"], help="the dataset's columns: "
                        "rl (prompt + solution), sft (messages: the prompt is cut before the last answer), preference")  # fmt: skip
    parser.add_argument("--columns", nargs="*", default=[], help="column renames, ours=theirs (as train.py's)")
    parser.add_argument("--num-samples", type=int, default=8, help="held-out samples to show")
    parser.add_argument("--max-new-tokens", type=int, default=Config.max_completion_length)
    parser.add_argument("--out", default="compare.html", help="the HTML page; the markdown table goes beside it (.md)")
    args = parser.parse_args(argv)
    if len(set(args.models)) < len(args.models):
        parser.error("a model is named twice; each column must be another model")
    prompts = held_out_prompts(args.dataset, args.eval_split, args.format, args.num_samples, tuple(args.columns))
    answers = answer_all(args.models, prompts, args.max_new_tokens)
    out = Path(args.out)
    out.write_text(html_page(prompts, answers))
    out.with_suffix(".md").write_text(table := markdown_table(prompts, answers))
    print(table + f"-> {out}, {out.with_suffix('.md')}", flush=True)
    return answers


if __name__ == "__main__":
    main()
