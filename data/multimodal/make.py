"""Makes the multimodal prompt set in this folder: images and audio clips, each with a question and, where
it is known, its answer (prompts.jsonl). Run once; the files are committed.

  python data/multimodal/make.py     (needs scikit-image for the photographs, espeak-ng for spoken words)

Photographs: scikit-image's `skimage.data` (public domain, see data/README.md). Everything else is
generated here: solid colours, counted shapes, a bar chart with known values, rendered words, pure
tones, and words spoken by espeak-ng.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
SIZE = 224
RATE = 16000  # audio towers (Gemma 4's included) take 16 kHz mono


def colours() -> list[dict]:
    items = []
    for name, rgb in (("red", (220, 20, 30)), ("green", (30, 160, 60)), ("blue", (30, 60, 200)),
                      ("yellow", (240, 210, 30))):
        Image.new("RGB", (SIZE, SIZE), rgb).save(HERE / f"colour-{name}.png")
        items.append({"file": f"colour-{name}.png", "question": "What colour is this image? Answer with one word.",
                      "answer": name})
    return items


def shapes() -> list[dict]:
    items = []
    for count in (2, 3, 5):
        image = Image.new("RGB", (SIZE, SIZE), "white")
        draw = ImageDraw.Draw(image)
        for i in range(count):
            angle = 2 * math.pi * i / count
            x, y = SIZE / 2 + 70 * math.cos(angle), SIZE / 2 + 70 * math.sin(angle)
            draw.ellipse((x - 22, y - 22, x + 22, y + 22), fill="black")
        image.save(HERE / f"circles-{count}.png")
        items.append({"file": f"circles-{count}.png", "question": "How many circles are in this image? Answer "
                      "with a number.", "answer": str(count)})
    return items


def bar_chart() -> list[dict]:
    values = {"A": 3, "B": 7, "C": 5}
    image = Image.new("RGB", (SIZE, SIZE), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=20)
    for i, (label, value) in enumerate(values.items()):
        left = 30 + i * 65
        draw.rectangle((left, 190 - value * 22, left + 40, 190), fill=(40, 90, 180))
        draw.text((left + 12, 195), label, fill="black", font=font)
    image.save(HERE / "bars.png")
    return [{"file": "bars.png", "question": "Which bar is the tallest: A, B or C? Answer with one letter.",
             "answer": max(values, key=values.get)}]


def words() -> list[dict]:
    items = []
    font = ImageFont.load_default(size=48)
    for word in ("CAT", "RIVER"):
        image = Image.new("RGB", (SIZE, SIZE), "white")
        ImageDraw.Draw(image).text((SIZE / 2, SIZE / 2), word, fill="black", font=font, anchor="mm")
        image.save(HERE / f"word-{word.lower()}.png")
        items.append({"file": f"word-{word.lower()}.png", "question": "What word is written in this image?",
                      "answer": word.lower()})
    return items


def photographs() -> list[dict]:
    from skimage import data

    items = []
    for name, question in (("astronaut", "What is the person in this photograph wearing?"),
                           ("coffee", "What is in the cup?"), ("chelsea", "What animal is this?"),
                           ("rocket", "What is shown in this photograph?")):
        Image.fromarray(getattr(data, name)()).convert("RGB").resize((SIZE, SIZE)).save(HERE / f"photo-{name}.png")
        items.append({"file": f"photo-{name}.png", "question": question, "answer": None})
    return items


def write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(RATE)
        f.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def tones() -> list[dict]:
    items = []
    t = np.arange(RATE) / RATE
    for name, hz in (("low", 220), ("high", 1760)):
        write_wav(HERE / f"tone-{name}.wav", 0.5 * np.sin(2 * np.pi * hz * t) * np.minimum(1, 20 * (1 - t)))
        items.append({"file": f"tone-{name}.wav", "question": "Is this a high or a low tone? Answer with one word.",
                      "answer": name})
    return items


def spoken() -> list[dict]:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise SystemExit("espeak-ng is needed for the spoken words: apt-get install espeak-ng")
    items = []
    for word in ("seven", "orange"):
        raw = HERE / f"spoken-{word}.raw.wav"
        subprocess.run([espeak, "-v", "en", "-s", "140", "-w", str(raw), word], check=True)
        with wave.open(str(raw)) as f:  # espeak-ng writes 22,050 Hz: resampled to 16 kHz
            samples = np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(np.float32) / 32768
            source_rate = f.getframerate()
        raw.unlink()
        positions = np.arange(0, len(samples) - 1, source_rate / RATE)
        write_wav(HERE / f"spoken-{word}.wav", np.interp(positions, np.arange(len(samples)), samples))
        items.append({"file": f"spoken-{word}.wav", "question": "What word is spoken in this clip?", "answer": word})
    return items


def main() -> None:
    prompts = []
    for kind, makers in (("image", (colours, shapes, bar_chart, words, photographs)), ("audio", (tones, spoken))):
        for make in makers:
            prompts += [{"id": Path(item["file"]).stem, "kind": kind, "made_by": make.__name__, **item}
                        for item in make()]
    (HERE / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    print(f"{len(prompts)} prompts in {HERE / 'prompts.jsonl'}")


if __name__ == "__main__":
    main()
