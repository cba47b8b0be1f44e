"""A multimodal checkpoint's processor, and the media of the prompt set read as it expects them."""
from __future__ import annotations

import wave
from pathlib import Path

import numpy as np


def gemma4_without_video():
    """Gemma 4's processor for images and audio. Its video half needs torchvision, which has no CPU build on
    PyPI for this torch: without it AutoProcessor cannot build Gemma 4's processor at all."""
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor
    from transformers.processing_utils import ProcessorMixin

    class Gemma4ImageAudioProcessor(Gemma4Processor):
        def __init__(self, feature_extractor, image_processor, tokenizer, chat_template=None, image_seq_length=280,
                     audio_seq_length=750, audio_ms_per_token=40, **kwargs):
            # Gemma4Processor.__init__'s attributes, without the video processor and its token
            self.image_seq_length, self.audio_seq_length = image_seq_length, audio_seq_length
            self.audio_ms_per_token = audio_ms_per_token
            self.image_token_id, self.image_token = tokenizer.image_token_id, tokenizer.image_token
            self.boi_token, self.eoi_token = tokenizer.boi_token, tokenizer.eoi_token
            self.audio_token_id, self.audio_token = (getattr(tokenizer, "audio_token_id", None),
                                                     getattr(tokenizer, "audio_token", None))
            self.boa_token, self.eoa_token = getattr(tokenizer, "boa_token", None), getattr(tokenizer, "eoa_token", None)
            ProcessorMixin.__init__(self, feature_extractor=feature_extractor, image_processor=image_processor,
                                    tokenizer=tokenizer, chat_template=chat_template, **kwargs)

    return Gemma4ImageAudioProcessor


def load_processor(checkpoint: str | Path):
    """The checkpoint's own processor (AutoProcessor); Gemma 4's without its video half where torchvision is
    missing."""
    from transformers import AutoConfig, AutoProcessor
    from transformers.utils import is_torchvision_available

    model_type = AutoConfig.from_pretrained(checkpoint).model_type
    if model_type == "gemma4" and not is_torchvision_available():
        return gemma4_without_video().from_pretrained(checkpoint)
    return AutoProcessor.from_pretrained(checkpoint)


def read_wav(path: Path, rate: int) -> np.ndarray:
    """A 16-bit PCM WAV file as float32 samples in [-1, 1], mono, resampled (linearly) to `rate` Hz."""
    with wave.open(str(path)) as f:
        if f.getsampwidth() != 2:
            raise ValueError(f"{path}: {8 * f.getsampwidth()}-bit samples; the prompt set's clips are 16-bit PCM")
        samples = np.frombuffer(f.readframes(f.getnframes()), np.int16).astype(np.float32) / 32768
        samples = samples.reshape(-1, f.getnchannels()).mean(axis=1)
        have = f.getframerate()
    if have == rate:
        return samples
    n = round(len(samples) * rate / have)
    return np.interp(np.arange(n) * have / rate, np.arange(len(samples)), samples).astype(np.float32)
