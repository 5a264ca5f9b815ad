"""Our Mimi against Kyutai's reference, full official config, random weights, real speech."""

import pytest
import torch
from oracle import assert_codes_equal_up_to_ties
from safetensors import safe_open

from moshi_core.formats.audio import load_audio
from moshi_core.models.mimi import MimiModel

SPEECH = [
    "en_question_24k.wav",
    "en_long_24k.wav",  # longer than the 10 s attention window
    "en_short_16k.wav",  # shorter than one second, not a whole number of frames
    "en_question_44k_stereo.wav",
    "fr_human_intro.mp3",
]
AUDIO_TOLERANCE = 1e-4


# What `make test-fast` keeps of each test over files: a 24 kHz file and the odd-length 16 kHz one
# (resampled, a partial last frame). The others cost seconds each, for the same code once the audio
# is loaded, and run in the full suite.
FAST_SPEECH = ("en_question_24k.wav", "en_short_16k.wav")


def slow_except_fast(names: list[str]) -> list:
    return [name if name in FAST_SPEECH else pytest.param(name, marks=pytest.mark.slow) for name in names]


@pytest.fixture(scope="module")
def speech(shared_audio):
    return {name: load_audio(shared_audio / name)[None] for name in SPEECH}  # [1, 1, T]


def test_module_has_exactly_the_official_tensors(mimi_checkpoint):
    ours = MimiModel().state_dict()
    with safe_open(str(mimi_checkpoint), "pt") as f:
        official = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert len(official) == 318
    assert {k: tuple(v.shape) for k, v in ours.items()} == official
    assert sum(p.numel() for p in MimiModel().parameters()) == 79_308_609


@pytest.mark.parametrize("name", slow_except_fast(SPEECH))
def test_offline_matches_reference(name, speech, our_mimi, ref_mimi):
    wav = speech[name]
    with torch.inference_mode():
        ref_codes = ref_mimi.encode(wav)
        codes = our_mimi.encode(wav)
        assert codes.shape == (1, 8, -(-wav.shape[-1] // 1920))
        # Exact ties (two centroids at the same distance) fall either way with the CPU's summation order.
        padded = torch.nn.functional.pad(wav, (0, -wav.shape[-1] % 1920))
        assert_codes_equal_up_to_ties(codes, ref_codes, ref_mimi, padded)
        assert len(codes.unique()) >= min(100, codes.numel() // 4)  # the codebooks are really used
        ref_audio = ref_mimi.decode(ref_codes)
        audio = our_mimi.decode(ref_codes)
    assert audio.shape == ref_audio.shape
    assert (audio - ref_audio).abs().max() < AUDIO_TOLERANCE
    assert ref_audio.abs().max() > 0.01  # the comparison is not between two silences


# Stepped one frame at a time, a long file takes minutes on 2 cores. The 23 s mp3 is stepped for its
# first 12 s: past the 10 s attention window, as en_long_24k (16 s) is whole.
FRAME_BY_FRAME_SECONDS = {"fr_human_intro.mp3": 12}


@pytest.mark.parametrize("name", slow_except_fast(SPEECH))
def test_streaming_frame_by_frame_matches_reference(name, speech, our_mimi, ref_mimi):
    seconds = FRAME_BY_FRAME_SECONDS.get(name)
    wav = speech[name] if seconds is None else speech[name][..., : 24000 * seconds]
    wav = torch.nn.functional.pad(wav, (0, -wav.shape[-1] % 1920))
    frames = wav.split(1920, dim=-1)
    with torch.inference_mode():
        ref_codes = ref_mimi.encode(wav)
        ref_audio = ref_mimi.decode(ref_codes)
        state = our_mimi.init_state(1)
        codes = torch.cat([our_mimi.encode_step(frame, state) for frame in frames], dim=-1)
        audio = torch.cat([our_mimi.decode_step(c, state) for c in ref_codes.split(1, dim=-1)], dim=-1)
    assert_codes_equal_up_to_ties(codes, ref_codes, ref_mimi, wav)
    assert (audio - ref_audio).abs().max() < AUDIO_TOLERANCE


@pytest.mark.parametrize("name", slow_except_fast(["en_question_24k.wav", "en_question_44k_stereo.wav",
                                                   "en_short_16k.wav"]))
def test_streaming_matches_reference_streaming(name, speech, our_mimi, ref_mimi):
    """Within its 10 s attention window the reference's own streaming gives our codes."""
    wav = speech[name]
    wav = torch.nn.functional.pad(wav, (0, -wav.shape[-1] % 1920))
    with torch.inference_mode(), ref_mimi.streaming(1):
        ref_codes = torch.cat([ref_mimi.encode(f) for f in wav.split(1920, dim=-1)], dim=-1)
    with torch.inference_mode():
        state = our_mimi.init_state(1)
        codes = our_mimi.encode_step(wav, state)
    assert torch.equal(codes, ref_codes)


def test_all_32_codebooks_match_reference(speech, our_mimi, ref_mimi):
    wav = speech["en_question_24k.wav"]
    ref_mimi.set_num_codebooks(32)
    try:
        with torch.inference_mode():
            ref_codes = ref_mimi.encode(wav)
            ref_audio = ref_mimi.decode(ref_codes)
            codes = our_mimi.encode(wav, num_codebooks=32)
            audio = our_mimi.decode(ref_codes)  # the same codes on both sides
        # A tie at one level changes every level below it: the frame counts as one difference.
        padded = torch.nn.functional.pad(wav, (0, -wav.shape[-1] % 1920))
        assert_codes_equal_up_to_ties(codes, ref_codes, ref_mimi, padded)
    finally:
        ref_mimi.set_num_codebooks(8)
    assert (audio - ref_audio).abs().max() < AUDIO_TOLERANCE


@pytest.mark.parametrize("k", [1, 2, 5, 16])
def test_fewer_codebooks_are_a_prefix_and_decode_like_reference(k, speech, our_mimi, ref_mimi):
    wav = speech["en_short_16k.wav"]
    with torch.inference_mode():
        full = our_mimi.encode(wav, num_codebooks=32)
        codes = our_mimi.encode(wav, num_codebooks=k)
        audio = our_mimi.decode(codes)
        ref_audio = ref_mimi.decode(codes)
    assert torch.equal(codes, full[:, :k])
    assert (audio - ref_audio).abs().max() < AUDIO_TOLERANCE
