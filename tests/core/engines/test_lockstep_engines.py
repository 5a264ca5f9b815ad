"""The engines stepped both ways, lockstep (every slot under an active mask, what CUDA runs) and
by rows (only the stepped slots, what a CPU runs): each conversation, joining and leaving at
its own steps, gets what it gets alone. On CPU, forced either way; with a small random Mimi of
the real codec's layout (the full-size one steps too slowly for this many steps on 2 cores)."""

import dataclasses

import numpy as np
import pytest
import torch
from oracle import write_stt_folder
from test_live_engine import HOT, assert_same_conversation, lone_session
from tiny_mimi import tiny_mimi
from tts_oracle import tiny_tts  # noqa: F401 (fixture)

from moshi_core.engines.dialogue import Dialogue, DialogueBatch
from moshi_core.engines.live import LiveEngine
from moshi_core.inference.step_batch import StepBatch
from moshi_core.inference.generate import LMGenerator
from moshi_core.inference.stt import Transcriber, load_stt
from moshi_core.kernels import build as cpu_kernels
from moshi_core.models.mimi import MimiModel
from moshi_core.params import SamplingParams

FRAME = 1920
BOTH_WAYS = pytest.mark.parametrize("lockstep", [False, True], ids=["rows", "lockstep"])


def small_mimi(n_q: int, bins: int) -> MimiModel:
    """`tiny_mimi`'s layout with the codebooks an LM of `n_q` streams of `bins` tokens needs."""
    base = tiny_mimi().cfg
    torch.manual_seed(0)
    mimi = MimiModel(dataclasses.replace(base, quantizer=dataclasses.replace(base.quantizer, n_q=n_q, bins=bins),
                                         num_codebooks=n_q)).eval()
    with torch.no_grad():
        for layer in [*mimi.quantizer.rvq_first.vq.layers, *mimi.quantizer.rvq_rest.vq.layers]:
            layer._codebook.embedding_sum.normal_()
    return mimi


@pytest.fixture(scope="module")
def models(tiny_models):
    cfg = tiny_models.lm.cfg
    return dataclasses.replace(tiny_models, mimi=small_mimi(cfg.n_q - cfg.dep_q, cfg.card))


@pytest.fixture(scope="module")
def speech(shared_audio) -> list[np.ndarray]:
    from moshi_core.formats.audio import load_audio

    wav = load_audio(shared_audio / "en_question_24k.wav")[0].numpy()
    return list(wav[: 3 * 8 * FRAME].reshape(3, 8, FRAME))


def test_a_step_batch_gathers_and_scatters_only_in_lockstep():
    rows, lockstep = StepBatch([2, 0], 3, lockstep=False), StepBatch([2, 0], 3, lockstep=True)
    x = torch.tensor([[5.0], [7.0]])
    assert rows.rows("cpu").tolist() == [2, 0] and rows.active("cpu") is None and rows.inputs(x) is x
    assert lockstep.rows("cpu") is None and lockstep.active("cpu").tolist() == [True, False, True]
    full = lockstep.inputs(x)
    assert full.tolist() == [[7.0], [0.0], [5.0]] and torch.equal(lockstep.outputs(full), x)
    assert StepBatch([0, 1, 2], 3, lockstep=False).rows("cpu") is None  # the whole batch, in order
    assert StepBatch([1, 0, 2], 3, lockstep=False).rows("cpu").tolist() == [1, 0, 2]


@BOTH_WAYS
def test_live_conversations_joining_and_leaving_equal_lone_sessions(models, speech, lockstep):
    """Slot 0 talks throughout; slot 1 starts at step 2 and leaves at step 5, when a newcomer
    takes it; slot 2 stays free."""
    engine = LiveEngine(models, slots=3, lockstep=lockstep)
    assert engine.lockstep is lockstep
    first, second = engine.open(HOT, seed=1), engine.open(HOT, seed=2)
    out = {"first": [], "second": [], "third": []}
    for t in range(8):
        if t == 5:
            engine.close(second)
            assert engine.open(HOT, seed=3) == second
        frames = {first: speech[0][t]}
        if 2 <= t < 5:
            frames[second] = speech[1][t - 2]
        elif t >= 5:
            frames[second] = speech[2][t - 5]
        step = engine.step(frames)
        out["first"].append(step[first])
        if second in step:
            out["second" if t < 5 else "third"].append(step[second])
    assert_same_conversation(out["first"], lone_session(models, speech[0], HOT, 1))
    assert_same_conversation(out["second"], lone_session(models, speech[1][:3], HOT, 2))
    assert_same_conversation(out["third"], lone_session(models, speech[2][:3], HOT, 3))
    # Only the conversations' slots moved: the free one is where it started.
    assert engine._lm_state.offsets.tolist() == [8, 3, 0]
    assert engine._mimi_state.encoder.transformer.offset[2] == 0


def dialogue(models, frames: int, seed: int) -> Dialogue:
    cfg = models.lm.cfg
    codes = torch.randint(0, cfg.card, (cfg.n_q - cfg.dep_q, frames), generator=torch.Generator().manual_seed(seed))
    return Dialogue(codes, HOT, seed)


def run_batch(batch: DialogueBatch, dialogues: list[Dialogue]) -> None:
    batch.join(dialogues)
    while not batch.idle:
        assert all(d.error is None for d in batch.step())


@BOTH_WAYS
def test_dialogues_of_different_lengths_in_a_batch_answer_as_alone(models, lockstep):
    """Three dialogues on two slots: the shortest leaves first and the third takes its slot."""
    together = [dialogue(models, n, seed) for n, seed in ((6, 1), (3, 2), (4, 3))]
    run_batch(DialogueBatch(models, slots=2, lockstep=lockstep), together)
    assert max(d.peak_batch for d in together) == 2
    for d in together:
        lone = dialogue(models, d.num_frames, d.seed)
        run_batch(DialogueBatch(models, slots=1, lockstep=lockstep), [lone])
        assert len(d.frames) == d.num_frames
        if cpu_kernels.supported():  # our kernels compute every row alone; PyTorch's GEMMs need not
            assert torch.equal(torch.stack(d.frames), torch.stack(lone.frames))


@pytest.fixture(scope="module")
def stt(tmp_path_factory, mimi_checkpoint, tokenizer_model):
    folder = tmp_path_factory.mktemp("stt-lockstep")
    write_stt_folder(folder, "stt-1b-en_fr", mimi_checkpoint, tokenizer_model)
    models = load_stt(str(folder), dtype=torch.float32)
    return dataclasses.replace(models, mimi=small_mimi(models.lm.cfg.n_q, models.lm.cfg.card))


@BOTH_WAYS
def test_transcription_streams_stepped_in_any_mix_equal_each_alone(stt, speech, lockstep):
    """Stream 0 steps every frame, stream 2 joins at frame 2 and pauses at frame 4; 1 never steps."""
    transcriber = Transcriber(stt, lockstep=lockstep)
    state = transcriber.init_state(3)
    fed = {0: [], 2: []}
    tokens = {0: [], 2: []}
    pauses = {0: [], 2: []}
    for t in range(6):
        rows = [0] if t < 2 or t == 4 else [2, 0]  # any order
        pcm = torch.stack([torch.from_numpy(speech[0 if r == 0 else 1][t]) for r in rows])[:, None]
        result = transcriber.step(pcm, state, rows)
        for i, r in enumerate(rows):
            fed[r].append(pcm[i])
            tokens[r].append(int(result.tokens[i]))
            pauses[r].append(result.pause[i])
    assert state.lm.offsets.tolist() == [6, 0, 3]
    for r in (0, 2):
        alone = Transcriber(stt, lockstep=lockstep)
        lone_state = alone.init_state(1)
        lone = [alone.step(frame[None], lone_state) for frame in fed[r]]
        assert tokens[r] == [int(s.tokens[0]) for s in lone]
        torch.testing.assert_close(torch.stack(pauses[r]), torch.cat([s.pause for s in lone]), rtol=0, atol=1e-5)


def test_warming_up_on_a_state_leaves_it_as_fresh(tiny_models):
    """An engine's warm-up runs on its own state (the one a CUDA graph is captured for) and
    resets it: its next steps are those of a fresh state."""
    generator = LMGenerator(tiny_models.lm, SamplingParams(temp=1.0, temp_text=1.0))
    assert not generator.compiled  # the CPU steps eagerly: the engines do not warm up
    with torch.inference_mode():
        warmed, fresh = (generator.init_state(2, per_slot_sampling=True) for _ in range(2))
        for state in (warmed, fresh):
            state.slots.configure(0, HOT, 7)
            state.slots.configure(1, HOT, 8)
        assert generator.warm_up(warmed, steps=2) >= 0
        assert torch.equal(warmed.offsets, fresh.offsets) and torch.equal(warmed.tokens, fresh.tokens)
        assert torch.equal(warmed.sampling.draws, fresh.sampling.draws)
        assert torch.equal(warmed.lm.positions, fresh.lm.positions)
        codes = torch.randint(0, tiny_models.lm.cfg.card, (2, 8, 1), generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            assert torch.equal(generator.step(codes, warmed), generator.step(codes, fresh))


def test_states_are_marked_static_for_cuda_graphs_only(tiny_models):
    """CUDA graphs update in place only inputs at fixed addresses: a generator compiled for
    them marks every tensor of the states it makes (never called here: nothing compiles)."""
    generator = LMGenerator(tiny_models.lm)
    plain = generator.init_state(1)
    generator.compile_step(mode="reduce-overhead")
    marked = generator.init_state(1)
    assert generator.compiled
    assert all(getattr(t, "_dynamo_static_input_type", None) for t in marked.tensors())
    assert not any(getattr(t, "_dynamo_static_input_type", None) for t in plain.tensors())


@pytest.fixture
def portable():
    """The fused CPU kernels are opaque to dynamo: the graph is traced on PyTorch's own ops
    (what a GPU runs)."""
    was = cpu_kernels.ENABLED
    cpu_kernels.set_enabled(False)
    yield
    cpu_kernels.set_enabled(was)


def test_mimi_warmed_up_on_a_state_leaves_it_as_fresh_and_compiled_steps_equal_eager(portable):
    """Mimi's lockstep steps compiled (the `eager` backend: dynamo's trace, no codegen on a
    CPU) and warmed up on a state give what eager steps give on a fresh one."""
    eager, compiled = small_mimi(8, 64), small_mimi(8, 64)
    compiled.compile_steps(backend="eager")
    assert compiled.compiled and not eager.compiled
    with torch.inference_mode():
        warmed, fresh = compiled.init_state(2), eager.init_state(2)
        assert compiled.warm_up(warmed, 8, decoded=8) >= 0
        for now, new in zip(warmed.tensors(), fresh.tensors()):
            if now.dtype == torch.long:  # positions and offsets; stale cache entries are never read
                assert torch.equal(now, new)
        wav = torch.randn(2, 1, FRAME, generator=torch.Generator().manual_seed(0)) * 0.1
        active = torch.tensor([True, False])
        for _ in range(3):
            codes = compiled.encode_step(wav, warmed, 8, active=active)
            torch.testing.assert_close(codes[:1], eager.encode_step(wav, fresh, 8, active=active)[:1], rtol=0, atol=0)
            pcm = compiled.decode_step(codes, warmed, active=active)
            torch.testing.assert_close(pcm[:1], eager.decode_step(codes, fresh, active=active)[:1], rtol=0, atol=1e-6)


def test_mimi_states_are_marked_static_for_cuda_graphs_only():
    mimi = small_mimi(8, 64)
    plain = mimi.init_state(1)
    mimi.compile_steps(mode="reduce-overhead")  # lazy: nothing compiles here
    marked = mimi.init_state(1)
    assert len(marked.tensors()) > 8
    assert all(getattr(t, "_dynamo_static_input_type", None) for t in marked.tensors())
    assert not any(getattr(t, "_dynamo_static_input_type", None) for t in plain.tensors())


# Lockstep TTS (not a default anywhere) takes ~20 s on 2 cores: the full run only.
@pytest.mark.parametrize("lockstep", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["rows", "lockstep"])
def test_a_tts_request_that_ends_first_leaves_the_others_as_alone(tiny_tts, lockstep):
    """Sampled: the short request stops stepping (masked or dropped) while the long one goes on."""
    from tts_oracle import VOICES

    from moshi_core.inference.tts import TTSRequest, TTSSession, load_tts
    from moshi_core.params import TTSParams

    folder, voices = tiny_tts
    model = load_tts(folder, voices=voices, dtype=torch.float32)
    model = dataclasses.replace(model, mimi=small_mimi(model.lm.cfg.dep_q, model.lm.cfg.card))
    requests = [TTSRequest("hello", VOICES[0], TTSParams(seed=11, max_padding=2)),
                TTSRequest("bonjour paris, comment allez vous", VOICES[1], TTSParams(seed=12, max_padding=2))]
    batch = TTSSession(model, requests, lockstep=lockstep)
    pcm = {0: [], 1: []}
    for chunk in batch.stream():
        pcm[chunk.request].append(chunk.pcm)
    assert batch.end_step(0) < batch.end_step(1)
    for i, request in enumerate(requests):
        alone = TTSSession(model, [request], lockstep=lockstep)
        alone_pcm = torch.cat([c.pcm for c in alone.stream()])
        n = len(alone.frames)
        assert torch.equal(torch.stack(batch.frames[:n])[:, i], torch.stack(alone.frames)[:, 0])
        assert batch.words(i) == alone.words(0) and batch.end_step(i) == alone.end_step(0)
        torch.testing.assert_close(torch.cat(pcm[i]), alone_pcm, atol=1e-5, rtol=1e-4)
    if not lockstep:  # the short request's rows were dropped: its cache stopped where it ended
        assert batch.cache.offset[0] < batch.cache.offset[1]


def test_a_compiled_engine_warms_up_as_a_stage_of_its_models_load():
    """Where the step compiles (CUDA), building an engine is a "warming up" stage of its
    model's load record (/readyz, the log, a waiting page); elsewhere nothing is recorded."""
    from types import SimpleNamespace

    from workers.models import ModelCache
    from workers.settings import Settings

    cache = ModelCache(Settings())
    stages = []
    cache.progress.subscribe(lambda status: stages.append((status.model, status.stage)))
    assert cache.engine("moshi", SimpleNamespace(compiles=True), lambda: "engine") == "engine"
    assert stages == [("moshi", "warming up"), ("moshi", "ready")]
    stages.clear()
    assert cache.engine("moshi", SimpleNamespace(compiles=False), lambda: "engine") == "engine" and stages == []
