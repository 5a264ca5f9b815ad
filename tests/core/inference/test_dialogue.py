"""Offline dialogue end to end: tokenizer, registry, pipeline and `moshi-core dialogue`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch

from moshi_core.errors import CheckpointError, ModelSourceError
from moshi_core.formats.text import TextStream, TextTokenizer

REPO_DIR = Path(__file__).resolve().parents[3]


def test_text_stream_builds_timed_words(tokenizer_model):
    tok = TextTokenizer(tokenizer_model)
    ids = tok.encode("hello how are you")
    stream = TextStream(tok)
    shown = ""
    for frame, token in enumerate([3, 3] + [t for i in ids for t in (i, 3)]):
        shown += stream.push(token, frame)
    words = stream.flush()
    assert [w.text for w in words] == ["hello", "how", "are", "you"]
    assert stream.text == "hello how are you" and shown.strip() == "hello how are you"
    assert words[0].start == pytest.approx(0.16)  # after two padding steps of 80 ms
    assert all(w.end > w.start for w in words)
    assert all(a.end <= b.start for a, b in zip(words, words[1:]))


def test_not_a_tokenizer(tmp_path):
    bad = tmp_path / "x.model"
    bad.write_bytes(b"nope")
    with pytest.raises(CheckpointError, match="not a SentencePiece model"):
        TextTokenizer(bad)


@pytest.mark.e2e  # the installed command
def test_dialogue_cli_writes_three_outputs(tmp_path, tiny_moshi, shared_audio):
    source = shared_audio / "en_question_24k.wav"
    out, text, stereo = tmp_path / "moshi.wav", tmp_path / "moshi.json", tmp_path / "stereo.wav"
    done = subprocess.run(
        [sys.executable, "-m", "moshi_core", "dialogue", str(source), "-o", str(out), "--text", str(text),
         "--stereo", str(stereo), "--model", str(tiny_moshi), "--seed", "3", "--dtype", "float32", "--device", "cpu"],
        cwd=REPO_DIR, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert "dialogue: 100%" in done.stderr
    n = sf.info(str(source)).frames
    mono, st = sf.info(str(out)), sf.info(str(stereo))
    assert (mono.samplerate, mono.channels, mono.frames) == (24000, 1, n)
    assert (st.samplerate, st.channels, st.frames) == (24000, 2, n)
    transcript = json.loads(text.read_text())
    assert set(transcript) == {"text", "words"}
    for word in transcript["words"]:
        assert 0 <= word["start"] < word["end"] <= n / 24000 + 0.08
    user_left = sf.read(str(stereo))[0][:, 0]
    original = sf.read(str(source))[0]
    assert abs(user_left - original).max() < 1e-3  # the left channel is the user


def test_dialogue_batch_and_seed(tiny_models, shared_audio):
    from moshi_core.formats.audio import load_audio
    from moshi_core.inference.dialogue import run_dialogue

    a = load_audio(shared_audio / "en_short_16k.wav")
    b = load_audio(shared_audio / "en_question_24k.wav")[:, :24000]  # longer than a: the batch pads it
    one = run_dialogue(tiny_models, a, seed=5)
    again = run_dialogue(tiny_models, a, seed=5)
    assert torch.equal(one.tokens, again.tokens)
    batch = run_dialogue(tiny_models, [a, b], seed=5)
    assert [r.audio.shape[-1] for r in batch] == [a.shape[-1], b.shape[-1]]
    assert batch[0].tokens.shape[0] == 9  # text + 8 audio codebooks per frame


def test_concurrent_dialogues_share_steps_and_answer_as_alone(tiny_models, shared_audio):
    """Three callers on an engine of two slots: two step together, the third joins when the
    shorter leaves; each gets, bit for bit, what it gets alone (its own seed and sampler)."""
    import threading

    from moshi_core.formats.audio import load_audio
    from moshi_core.kernels import build as cpu_kernels
    from workers.dialogue_engine import DialogueEngine

    wavs = [load_audio(shared_audio / "en_short_16k.wav"), load_audio(shared_audio / "en_question_24k.wav")[:, :48000],
            load_audio(shared_audio / "fr_human_intro.mp3")[:, :30000]]
    alone = [DialogueEngine(tiny_models, slots=1).run(w, seed=10 + i) for i, w in enumerate(wavs)]
    engine = DialogueEngine(tiny_models, slots=2)
    together: list = [None] * 3
    start = threading.Barrier(3)
    # Steps wait until every caller has handed its dialogue in: on a loaded machine the short one
    # could otherwise be done before the others have encoded theirs, and nothing would share a step.
    submitted, all_in = [], threading.Event()
    submit, step = engine._submit, engine._batch.step

    def counted_submit(dialogues):
        done = submit(dialogues)
        submitted.append(dialogues)
        if len(submitted) == 3:
            all_in.set()
        return done

    def gated_step():
        all_in.wait(60)
        return step()

    engine._submit, engine._batch.step = counted_submit, gated_step

    def call(i: int) -> None:
        start.wait()
        together[i] = engine.run(wavs[i], seed=10 + i)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert all(r is not None for r in together)
    assert max(r.peak_batch for r in together) == 2 and all(a.peak_batch == 1 for a in alone)
    for mine, lone in zip(together, alone):
        assert mine.tokens.shape == lone.tokens.shape
        if cpu_kernels.supported():  # our kernels compute every row alone; PyTorch's GEMMs need not
            assert torch.equal(mine.tokens, lone.tokens)
            assert torch.equal(mine.audio, lone.audio)


def test_a_cancelled_dialogue_leaves_the_others_running(tiny_models, shared_audio):
    import threading

    from moshi_core.formats.audio import load_audio
    from workers.dialogue_engine import DialogueEngine

    class Cancelled(Exception):
        pass

    def cancel_soon(done: int, total: int) -> None:
        if done > 3:
            raise Cancelled

    wav = load_audio(shared_audio / "en_question_24k.wav")[:, :72000]
    engine = DialogueEngine(tiny_models, slots=2)
    survivor: list = []
    other = threading.Thread(target=lambda: survivor.append(engine.run(wav, seed=1)))
    other.start()
    with pytest.raises(Cancelled):
        engine.run(wav, seed=2, progress=cancel_soon)
    other.join(timeout=600)
    assert survivor and survivor[0].tokens.shape[1] == 72000 // 1920 + (72000 % 1920 > 0)
    assert engine.run(wav[:, :9600], seed=3).tokens.shape[1] == 5  # the engine still serves


def test_the_batch_drops_cancelled_and_failed_dialogues_and_goes_on(tiny_models):
    """The stepper alone, in this thread: a cancelled dialogue in line leaves unseated, a
    step that fails fails the dialogues in it, and the next dialogue is stepped as usual."""
    from moshi_core.engines.dialogue import Dialogue, DialogueBatch
    from moshi_core.params import SamplingParams

    cfg = tiny_models.lm.cfg
    n_user = cfg.num_codebooks - cfg.dep_q - 1
    batch = DialogueBatch(tiny_models, slots=1)
    broken = Dialogue(torch.zeros(n_user, 3), SamplingParams(), seed=0)  # float codes: no embedding takes them
    cancelled = Dialogue(torch.zeros(n_user, 3, dtype=torch.long), SamplingParams(), seed=0, cancelled=True)
    good = Dialogue(torch.zeros(n_user, 3, dtype=torch.long), SamplingParams(), seed=0)
    batch.join([broken, cancelled, good])
    assert batch.step() == [cancelled, broken]  # the cancelled one never takes the free slot
    assert broken.error is not None and cancelled.steps == 0
    left = []
    while not batch.idle:
        left += batch.step()
    assert left == [good]
    assert good.error is None and len(good.frames) == 3 and good.peak_batch == 1


def test_bad_sources_and_configs(tmp_path, tiny_moshi):
    from moshi_core.loading.registry import load_moshi

    with pytest.raises(ModelSourceError, match="has no model.q8.gguf or model.safetensors or model.q8.safetensors"):
        load_moshi(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"dim": 8, "n_q": 2, "delays": [0]}))
    with pytest.raises(CheckpointError, match="delays"):
        load_moshi(broken)


def test_candle_q8_folder_runs_a_dialogue(tmp_path, tiny_moshi, shared_audio):
    """A folder laid out like kyutai/moshika-candle-q8: model.q8.gguf and no config.json
    is the 7B preset, so the tiny LM's config comes along as config.json here."""
    from oracle import write_candle_gguf

    from moshi_core.formats.audio import load_audio
    from moshi_core.inference.dialogue import run_dialogue
    from moshi_core.loading.files import read_safetensors
    from moshi_core.loading.registry import load_moshi

    folder = tmp_path / "candle-q8"
    folder.mkdir()
    for name in ("config.json", "tokenizer_spm_test.model", "tokenizer-e351c8d8-checkpoint125.safetensors"):
        (folder / name).symlink_to((tiny_moshi / name).resolve())
    write_candle_gguf(folder / "model.q8.gguf", read_safetensors(tiny_moshi / "model.safetensors"), 8)
    models = load_moshi(folder, dtype=torch.float32)
    result = run_dialogue(models, load_audio(shared_audio / "en_short_16k.wav"), seed=0)
    assert result.audio.shape[-1] == load_audio(shared_audio / "en_short_16k.wav").shape[-1]



def test_sampling_comes_from_the_repo_config_then_the_flags():
    from moshi_core.params import SamplingParams

    params = SamplingParams.from_config({"temp": 0.5, "top_k_text": 10, "cfg_coef": 2.0, **{"temp_text": 0.0}})
    assert (params.temp, params.top_k_text, params.temp_text, params.top_k) == (0.5, 10, 0.0, 250)


def test_bad_sampling_flag_is_refused_before_loading(tmp_path, shared_audio):
    done = subprocess.run(
        [sys.executable, "-m", "moshi_core", "dialogue", str(shared_audio / "en_short_16k.wav"), "-o",
         str(tmp_path / "x.wav"), "--temp-text", "-1", "--model", str(tmp_path / "no-such-model")],
        cwd=REPO_DIR, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and "temp_text must be between 0 and 10" in done.stderr
