"""nanoalign.compare: several models' greedy answers to the same held-out samples, as one
self-contained HTML page and a markdown table."""

import html
import re

from conftest import one_thread

from nanoalign import compare
from bench.common import load_hf_model
from nanoalign.model import load_processor, stop_and_pad_ids
from nanoalign.rewards import accuracy


def test_compare_shows_each_models_answer_to_each_sample(warm_model, tiny_dirs, tmp_path):
    out = tmp_path / "compare.html"
    models = [warm_model, "tiny"]  # an SFT export and a built-in random model: different answers
    with one_thread():
        compare.main([*models, "--num-samples", "3", "--max-new-tokens", "16", "--out", str(out)])
        prompts = compare.held_out_prompts("shapes", "eval", "rl", 3, ())
        expected = {}  # what training's eval decodes for each model, loaded here on its own
        for model, path in zip(models, [warm_model, tiny_dirs["tiny"]]):
            processor, hf_model = load_processor(str(path)), load_hf_model(str(path)).eval()
            stop_ids, pad_id = stop_and_pad_ids(processor, hf_model)
            *_, expected[model] = accuracy(hf_model, processor, prompts, batch_size=16, max_new_tokens=16,
                                           stop_ids=stop_ids, pad_id=pad_id, device="cpu")  # fmt: skip
    assert expected[warm_model] != expected["tiny"]  # else a swapped column would go unseen
    page = out.read_text()
    rows = re.findall(r'<tr class="sample">(.*?)</tr>', page, re.DOTALL)
    assert len(rows) == 3 and page.count('<img src="data:image/png;base64,') == 3  # one row and one inlined image per sample
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        assert f"<td>{html.escape(prompt['solution'])}</td>" in row  # the gold answer
        cells = re.findall(r'<td class="(right|wrong)">(.*?)</td>', row, re.DOTALL)
        assert cells == [("right" if expected[m][i][1] else "wrong", html.escape(expected[m][i][0])) for m in models]
    for model in models:  # each model's accuracy on top
        assert f"{html.escape(model)}<br>accuracy {sum(r for _, r in expected[model]) / 3:.2f}</th>" in page
    table = out.with_suffix(".md").read_text().splitlines()
    assert len(table) == 3 + 3 and all(table[3 + i].startswith(f"| {i} |") for i in range(3))  # header, rule, accuracy, rows
