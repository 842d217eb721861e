"""The built-in synthetic task: coloured shapes drawn with PIL, questions with one numeric answer.

Every sample is a pure function of (split, index), so the task needs no download, is the same on
every machine, and a resumed run sees exactly the samples it would have seen. Two question kinds:

    count:  "How many shapes are in the image?"      1..4 shapes      -> \\boxed{n}
    sides:  "How many sides does the shape have?"    one polygon 3..6 -> \\boxed{n}

Answers are numbers so the accuracy reward can check them with math-verify (nanoalign/rewards.py), and the
assistant turn has the "<think>...</think> answer" layout the format rewards look for (the reasoning
names the shapes' colour, e.g. "<think>I count 3 red shapes.</think> The answer is \\boxed{3}."). The same
sample comes in the three dataset formats TRL uses for vision data:

    sft:        {"messages": [user, assistant], "images": [PIL]}
    preference: {"prompt": [user], "chosen": [assistant], "rejected": [assistant], "images": [PIL]}
    rl:         {"prompt": [user], "images": [PIL], "solution": "$n$"}

Chance level is 1/4 for both kinds; `eval` uses a disjoint stream of seeds from `train`.
"""

import math
import random

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (150, 60, 190),
    "orange": (240, 130, 30),
}
COUNT_QUESTION = "How many shapes are in the image?"
SIDES_QUESTION = "How many sides does the shape have?"
KINDS = ("count", "sides")
SPLIT_SEEDS = {"train": 0, "eval": 1_000_003}  # disjoint seed streams per split


def _polygon(cx: float, cy: float, radius: float, num_sides: int, angle: float) -> list[tuple[float, float]]:
    """Vertices of a regular polygon centred on (cx, cy)."""
    return [
        (cx + radius * math.cos(angle + 2 * math.pi * k / num_sides), cy + radius * math.sin(angle + 2 * math.pi * k / num_sides))
        for k in range(num_sides)
    ]


def draw_shapes(rng: random.Random, num_shapes: int, size: int, radius: float, sides: list[int] | None = None,
                colour: str = "") -> Image.Image:  # fmt: skip
    """Draw `num_shapes` non-overlapping filled shapes of `radius` pixels on a light `size` x `size` canvas.

    `sides[i]` fixes shape i's polygon side count (0: a circle); otherwise each shape is a random
    polygon (3..6 sides) or a circle. `colour` (a COLOURS name) fills every shape; otherwise each
    shape gets a random one.
    """
    image = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    centres: list[tuple[float, float]] = []
    while len(centres) < num_shapes:  # rejection-sample centres far enough apart not to overlap
        cx, cy = rng.uniform(radius + 2, size - radius - 2), rng.uniform(radius + 2, size - radius - 2)
        if all(math.hypot(cx - x, cy - y) > 2.2 * radius for x, y in centres):
            centres.append((cx, cy))
    for i, (cx, cy) in enumerate(centres):
        fill = COLOURS[colour] if colour else COLOURS[rng.choice(sorted(COLOURS))]
        num_sides = sides[i] if sides is not None else rng.choice([0, 3, 4, 5, 6])
        if num_sides == 0:
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
        else:
            draw.polygon(_polygon(cx, cy, radius, num_sides, rng.uniform(0, 2 * math.pi)), fill=fill)
    return image


def completion_text(kind: str, answer: int, colour: str = "") -> str:
    """The assistant turn for an answer: a short reasoning block that names the shapes' colour (if
    one is given), then the boxed number."""
    shape = f"{colour} shape" if colour else "shape"
    reasoning = f"I count {answer} {shape}{'s' if answer != 1 else ''}." if kind == "count" else f"The {shape} has {answer} sides."
    return f"<think>{reasoning}</think> The answer is \\boxed{{{answer}}}."


def make_example(split: str, index: int, image_size: int = 112, images_per_sample: int = 1) -> dict:
    """One raw example: its images, question, kind and integer answer, a pure function of (split, index).

    With images_per_sample > 1 the question is always `count`, summed over all images.
    """
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown shapes split {split!r}; use one of {sorted(SPLIT_SEEDS)}")
    rng = random.Random(SPLIT_SEEDS[split] + index)
    if images_per_sample > 1:
        counts = [rng.randint(1, 4) for _ in range(images_per_sample)]
        images = [draw_shapes(rng, n, image_size, image_size / 8, sides=[0] * n) for n in counts]
        question = f"How many shapes are in these {images_per_sample} images in total?"
        return {"images": images, "question": question, "kind": "count", "answer": sum(counts), "colour": ""}
    kind = KINDS[index % len(KINDS)]  # alternate kinds so every batch mixes both
    # One colour per image, named in the answer: an easy fact to read off the image, which makes a
    # tiny model trained from scratch route the image to its answer early. Without it, when the
    # model started to count (rather than guess the prior) varied from run to run and machine to
    # machine (held-out accuracy 0.27-0.39 after the 600 steps of the SFT demo over three seeds;
    # 0.71-0.84 with the colour named).
    colour = rng.choice(sorted(COLOURS))
    if kind == "count":
        answer = rng.randint(1, 4)
        # All circles of one size and colour: the count is then proportional to the coloured area,
        # which a tiny vision tower trained from scratch can learn to measure within minutes.
        image = draw_shapes(rng, answer, image_size, image_size / 8, sides=[0] * answer, colour=colour)
        question = COUNT_QUESTION
    else:
        answer = rng.randint(3, 6)
        image = draw_shapes(rng, 1, image_size, image_size / 3, sides=[answer], colour=colour)  # big: sides readable
        question = SIDES_QUESTION
    return {"images": [image], "question": question, "kind": kind, "answer": answer, "colour": colour}


def user_turn(question: str, num_images: int) -> dict:
    """A user message holding the image placeholders, then the question (TRL's vision message layout)."""
    return {"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": question}]}


def assistant_turn(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def shapes_sample(split: str, index: int, fmt: str, image_size: int = 112, images_per_sample: int = 1, overcount: float = 0.0) -> dict:
    """Sample `index` of `split` in dataset format `fmt` ("sft", "preference" or "rl").

    overcount: fraction of "how many" answers in the SFT demonstrations that are one too many, a
    teacher with a systematic bias (the built-in RL warm start is trained on such a teacher, so RL
    and preference methods have something to correct that imitation cannot see).
    """
    ex = make_example(split, index, image_size, images_per_sample)
    prompt = [user_turn(ex["question"], len(ex["images"]))]
    correct = completion_text(ex["kind"], ex["answer"], ex["colour"])
    solution = f"${ex['answer']}$"  # the gold answer, in every format (the held-out accuracy eval reads it)
    if fmt == "sft":
        if ex["kind"] == "count" and random.Random(f"overcount-{split}-{index}").random() < overcount:
            correct = completion_text("count", ex["answer"] + 1, ex["colour"])
        return {"messages": prompt + [assistant_turn(correct)], "images": ex["images"], "solution": solution}
    if fmt == "preference":
        # The rejected answer is a wrong number in the same layout: only the image tells them apart.
        low, high = (1, 4 * images_per_sample) if ex["kind"] == "count" else (3, 6)
        wrong = random.Random(f"rejected-{split}-{index}").choice([n for n in range(low, high + 1) if n != ex["answer"]])
        return {
            "prompt": prompt,
            "chosen": [assistant_turn(correct)],
            "rejected": [assistant_turn(completion_text(ex["kind"], wrong, ex["colour"]))],
            "images": ex["images"],
            "solution": solution,
        }
    if fmt == "rl":
        return {"prompt": prompt, "images": ex["images"], "solution": solution}
    raise ValueError(f"unknown dataset format {fmt!r}; use 'sft', 'preference' or 'rl'")


def corpus(num_examples: int = 400) -> list[str]:
    """Text the built-in tokenizer is trained on: every question and answer layout of the task."""
    texts = [COUNT_QUESTION, SIDES_QUESTION]
    for n in range(1, 17):
        texts.append(f"How many shapes are in these {n} images in total?")
    for kind, answers in (("count", range(1, 17)), ("sides", range(3, 7))):
        texts += [completion_text(kind, a, c) for a in answers for c in ("", *COLOURS)]
    return texts * (num_examples // len(texts) + 1)
