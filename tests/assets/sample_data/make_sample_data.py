"""Regenerate the tiny shipped dataset: procedural images + LLaVA-format pretrain/finetune JSON.

Deterministic (fixed seed, no clock): `python tests/assets/sample_data/make_sample_data.py`.
Each image is a coloured background with a few shapes, so captions and answers are actually true.
"""

from __future__ import annotations

import json
import os
import random

from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
}
SHAPES = ["circle", "square", "triangle"]
# (file name, width, height): portrait, landscape, square, very wide and very tall images, so the
# AnyRes path sees every grid (1x2, 2x1, 2x2, 3x1, 1x3) and both unpad directions.
IMAGES = [
    ("img00.jpg", 640, 480),
    ("img01.jpg", 480, 640),
    ("img02.jpg", 336, 336),
    ("img03.jpg", 900, 300),
    ("img04.jpg", 300, 900),
    ("img05.png", 200, 150),
    ("img06.jpg", 800, 600),
    ("img07.jpg", 512, 512),
    ("img08.png", 120, 240),
    ("img09.jpg", 1024, 400),
    ("img10.jpg", 250, 700),
    ("img11.jpg", 700, 700),
]


def draw_image(rng: random.Random, width: int, height: int) -> tuple[Image.Image, dict]:
    background = rng.choice(["white", "gray", "yellow", "blue"])
    count = rng.randint(1, 3)
    shape = rng.choice(SHAPES)
    color = rng.choice([c for c in COLORS if c != background])
    image = Image.new("RGB", (width, height), COLORS[background])
    draw = ImageDraw.Draw(image)
    side = max(8, min(width, height) // 4)
    for i in range(count):
        # Shapes sit in equal horizontal slots so they never overlap and stay countable.
        cx = (2 * i + 1) * width // (2 * count)
        cy = height // 2 + rng.randint(-height // 8, height // 8)
        box = (cx - side // 2, cy - side // 2, cx + side // 2, cy + side // 2)
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=COLORS[color])
    facts = {"background": background, "count": count, "shape": shape, "color": color}
    return image, facts


def plural(facts: dict) -> str:
    words = {1: "one", 2: "two", 3: "three"}
    noun = facts["shape"] + ("s" if facts["count"] > 1 else "")
    return f"{words[facts['count']]} {facts['color']} {noun}"


def caption(facts: dict, variant: int) -> str:
    if variant == 0:
        return f"{plural(facts).capitalize()} on a {facts['background']} background."
    return f"A simple drawing with {plural(facts)} over a plain {facts['background']} backdrop."


def main() -> None:
    rng = random.Random(1234)
    image_dir = os.path.join(HERE, "images")
    os.makedirs(image_dir, exist_ok=True)
    facts_by_name = {}
    for name, width, height in IMAGES:
        image, facts = draw_image(rng, width, height)
        path = os.path.join(image_dir, name)
        if name.endswith(".png"):
            image.save(path, format="PNG", optimize=True)
        else:
            image.save(path, format="JPEG", quality=80)
        facts_by_name[name] = facts

    pretrain = []
    for variant in range(2):
        for name, _, _ in IMAGES:
            prompt = "<image>" if variant == 0 else "Describe the image briefly.\n<image>"
            pretrain.append(
                {
                    "id": f"pt-{variant}-{name.split('.')[0]}",
                    "image": f"images/{name}",
                    "conversations": [
                        {"from": "human", "value": prompt},
                        {"from": "gpt", "value": caption(facts_by_name[name], variant)},
                    ],
                }
            )

    finetune = []
    for i, (name, width, height) in enumerate(IMAGES):
        f = facts_by_name[name]
        turns = [
            {"from": "human", "value": "<image>\nWhat shape is shown in the picture?"},
            {"from": "gpt", "value": f"The picture shows {plural(f)}."},
            {"from": "human", "value": "What color is the background?"},
            {"from": "gpt", "value": f"The background is {f['background']}."},
        ]
        if i % 3 == 1:
            turns += [
                {"from": "human", "value": "Is the image wider than it is tall?"},
                {"from": "gpt", "value": "Yes, it is wider." if width > height else "No, it is not."},
            ]
        if i % 4 == 2:
            # The marker after the question, as in part of the LLaVA mix; the template moves it.
            turns[0] = {"from": "human", "value": "How many shapes are there?\n<image>"}
            turns[1] = {"from": "gpt", "value": f"There are {f['count']} of them: {plural(f)}."}
        finetune.append({"id": f"ft-{name.split('.')[0]}", "image": f"images/{name}", "conversations": turns})

    # A leading gpt turn (the template drops it), as found in some ShareGPT-derived samples.
    f = facts_by_name["img06.jpg"]
    finetune.append(
        {
            "id": "ft-leading-gpt",
            "image": "images/img06.jpg",
            "conversations": [
                {"from": "gpt", "value": "Hello! Send me a picture."},
                {"from": "human", "value": "<image>\nWhat color are the shapes?"},
                {"from": "gpt", "value": f"They are {f['color']}."},
            ],
        }
    )
    # Two images in one sample (the list form of "image").
    a, b = facts_by_name["img00.jpg"], facts_by_name["img07.jpg"]
    finetune.append(
        {
            "id": "ft-two-images",
            "image": ["images/img00.jpg", "images/img07.jpg"],
            "conversations": [
                {"from": "human", "value": "<image>\n<image>\nCompare the two pictures."},
                {
                    "from": "gpt",
                    "value": f"The first has {plural(a)}, the second has {plural(b)}.",
                },
            ],
        }
    )
    # Text-only samples (no "image" key), like the ShareGPT part of the 665K mix.
    text_only = [
        ("What is two plus three?", "Two plus three is 5."),
        ("Name a primary color.", "Red is a primary color."),
        ("How many sides does a triangle have?", "A triangle has 3 sides."),
        ("Say hello in French.", "Bonjour!"),
        ("What is the opposite of wide?", "The opposite of wide is narrow."),
        ("Count from one to four.", "One, two, three, four."),
    ]
    for i, (q, a_) in enumerate(text_only):
        turns = [{"from": "human", "value": q}, {"from": "gpt", "value": a_}]
        if i % 2 == 0:
            turns += [
                {"from": "human", "value": "Thanks. Can you repeat that?"},
                {"from": "gpt", "value": a_},
            ]
        finetune.append({"id": f"ft-text-{i}", "conversations": turns})
    # Interleave so that a short run sees both modalities.
    order = random.Random(99).sample(range(len(finetune)), len(finetune))
    finetune = [finetune[i] for i in order]

    for fname, data in (("pretrain.json", pretrain), ("finetune.json", finetune)):
        with open(os.path.join(HERE, fname), "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, ensure_ascii=False)
            fh.write("\n")


if __name__ == "__main__":
    main()
