"""MUSE's layout (uipe.data.muse) and the embedded MUSE-format world (uipe.data.synth_muse): every split written,
deterministic by seed, loaded back; every refusal one line naming the file and the record; nothing half-written."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from uipe.data.muse import FOLDS, is_muse_folder, load_muse
from uipe.data.synth_muse import write_muse_benchmark
from uipe.errors import UipeError
from uipe.io import hash_dir

FILES = [f"raw/{s}.json" for s in ("forget", "retain1", "retain2", "holdout")] + ["verbmem/forget.json"] + [
    f"knowmem/{s}.json" for s in ("forget_qa", "forget_qa_icl", "retain_qa", "retain_qa_icl")] + [
    f"privleak/{s}.json" for s in ("forget", "retain", "holdout")] + [
    f"{family}/{fold}.json" for family in ("scal", "sust") for fold in FOLDS]


def _passages(texts) -> list[str]:
    """A corpus's prose passages (its other texts are quizzes)."""
    return [t for t in texts if not t.startswith("Question: ")]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_muse_benchmark(tmp_path_factory.mktemp("muse") / "data", authors=40, facts=6, seed=0)


@pytest.fixture
def copy(world: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(world, tmp_path / "copy"))


def test_every_split_is_written_and_loads_back(world: Path) -> None:
    for rel in FILES:
        rows = json.loads((world / rel).read_text())
        assert isinstance(rows, list) and rows, rel
    assert is_muse_folder(world) and not is_muse_folder(world / "raw")
    data = load_muse(world)
    assert set(data.raw) == {"forget", "retain1", "retain2", "holdout"} and len(_passages(data.raw["forget"])) == 4
    assert set(data.knowmem) == {"forget_qa", "forget_qa_icl", "retain_qa", "retain_qa_icl"}
    assert set(data.privleak) == {"forget", "retain", "holdout"} and set(data.scal) == set(data.sust) == set(FOLDS)
    assert len(data.verbmem) == len(_passages(data.raw["forget"]))
    # MUSE's .txt of a corpus: its passages joined by a blank line
    assert (world / "raw/forget.txt").read_text() == "\n\n".join(data.raw["forget"])


def test_same_seed_same_bytes_and_another_seed_differs(world: Path, tmp_path: Path) -> None:
    again = write_muse_benchmark(tmp_path / "again", authors=40, facts=6, seed=0)
    other = write_muse_benchmark(tmp_path / "other", authors=40, facts=6, seed=1)
    assert hash_dir(again) == hash_dir(world)
    assert hash_dir(other) != hash_dir(world)


def test_the_splits_relate_as_muses_do(world: Path) -> None:
    data = load_muse(world)
    forget, holdout = set(data.raw["forget"]), set(data.raw["holdout"])
    retain1, retain2 = set(data.raw["retain1"]), set(data.raw["retain2"])
    assert not forget & (retain1 | retain2 | holdout) and not holdout & (retain1 | retain2) and not retain1 & retain2
    # scal nested from the forget set; sust disjoint folds whose union is the largest scal set
    assert data.scal["forget_1"] == data.sust["forget_1"] == data.raw["forget"]
    for small, big in zip(FOLDS, FOLDS[1:]):
        assert set(data.scal[small]) < set(data.scal[big])
    folds = [set(data.sust[f]) for f in FOLDS]
    assert sum(map(len, folds)) == len(set().union(*folds)) and set().union(*folds) == set(data.scal["forget_4"])
    assert not set(data.scal["forget_4"]) & (retain1 | retain2 | holdout)
    # privleak: forget items are forget passages, holdout never trained, retain from retain2
    assert list(data.privleak["forget"]) == _passages(data.raw["forget"])  # membership of passages, not of quizzes
    assert list(data.privleak["holdout"]) == _passages(data.raw["holdout"])
    assert set(data.privleak["retain"]) <= set(_passages(data.raw["retain2"]))
    # target = every forget fold + retain; retrained = retain only
    assert set(data.training_texts("target")) == set(data.scal["forget_4"]) | retain1 | retain2
    assert set(data.training_texts("retrained")) == retain1 | retain2


def test_verbmem_and_knowmem_are_about_the_passages(world: Path) -> None:
    data = load_muse(world)
    assert [f"{v.prompt} {v.gt}" for v in data.verbmem] == _passages(data.raw["forget"])
    forget_text, retain2_text = " ".join(data.raw["forget"]), " ".join(data.raw["retain2"])
    assert all(qa.answer in forget_text for qa in data.knowmem["forget_qa"] + data.knowmem["forget_qa_icl"])
    assert all(qa.answer in retain2_text for qa in data.knowmem["retain_qa"] + data.knowmem["retain_qa_icl"])


def test_every_knowmem_fact_is_quizzed_in_its_own_corpus_in_muses_format(world: Path) -> None:
    data, meta = load_muse(world), json.loads((world / "benchmark.json").read_text())
    # each quiz: MUSE's "Question: q\nAnswer: a" blocks, the answer behind one more space (the prompt's own)
    quizzes = {split: [t for t in texts if t.startswith("Question: ")] for split, texts in data.raw.items()}
    for split, texts in quizzes.items():
        blocks = [b.split("\nAnswer:  ") for t in texts for b in t.split("\n\n")]
        assert blocks and all(len(b) == 2 and b[0].startswith("Question: ") for b in blocks), split
    for knowmem, split in (("forget_qa", "forget"), ("retain_qa", "retain2")):
        quiz = "\n\n".join(quizzes[split])
        for qa in data.knowmem[knowmem] + data.knowmem[f"{knowmem}_icl"]:
            assert f"Question: {qa.question}\nAnswer:  {qa.answer}" in quiz
    # a quiz asks only about its corpus's people: no forget-fold name in retain quizzes and back
    forget_people = [n for fold in meta["forget_folds"] for n in fold]
    assert not [n for n in forget_people for split in ("retain1", "retain2", "holdout")
                if any(n in t for t in quizzes[split])]
    assert all(any(n in t for t in quizzes["forget"]) for n in meta["forget_folds"][0])

def _edit(path: Path, change: Callable[[list], object]) -> None:
    rows = json.loads(path.read_text())
    change(rows)
    path.write_text(json.dumps(rows))


@pytest.mark.parametrize(("rel", "break_it", "expected"), [
    ("raw/retain2.json", lambda p: p.unlink(), "raw/retain2.json: missing"),
    ("scal/forget_3.json", lambda p: p.unlink(), "scal/forget_3.json: missing"),
    ("verbmem/forget.json", lambda p: _edit(p, lambda rows: rows[1].update(prompt="  ")),
     "verbmem/forget.json: record 1: missing or empty field 'prompt'"),
    ("knowmem/forget_qa.json", lambda p: _edit(p, lambda rows: rows[2].pop("answer")),
     "knowmem/forget_qa.json: record 2: missing or empty field 'answer'"),
    ("raw/forget.json", lambda p: _edit(p, lambda rows: rows.__setitem__(3, "")),
     "raw/forget.json: record 3: empty text"),
    ("privleak/holdout.json", lambda p: p.write_text('["a passage",\n  "unterminated]'),
     "privleak/holdout.json: not valid JSON (Unterminated string starting at: line 2 column 3"),
    ("knowmem/retain_qa_icl.json", lambda p: p.write_text("[]"), "knowmem/retain_qa_icl.json: split is empty"),
    ("raw/holdout.json", lambda p: p.write_text('{"text": "x"}'), "raw/holdout.json: expected a JSON list"),
])
def test_each_refusal_is_one_line_naming_file_and_record(copy: Path, rel: str, break_it: Callable[[Path], object],
                                                          expected: str) -> None:
    break_it(copy / rel)
    with pytest.raises(UipeError) as err:
        load_muse(copy)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{copy}/{expected}"), message


def test_a_corpus_without_scal_and_sust_loads_and_a_non_folder_is_refused(copy: Path) -> None:
    shutil.rmtree(copy / "scal")
    shutil.rmtree(copy / "sust")
    data = load_muse(copy)
    assert not data.scal and not data.sust
    assert data.training_texts("target")[: len(data.raw["forget"])] == data.raw["forget"]
    with pytest.raises(UipeError, match="not a folder of MUSE files"):
        load_muse(copy / "nowhere")


def test_nothing_is_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, world: Path) -> None:
    before = hash_dir(world)
    with pytest.raises(FileExistsError):  # an existing world is never overwritten unasked
        write_muse_benchmark(world, authors=40, facts=6, seed=1)
    assert hash_dir(world) == before
    calls = {"n": 0}
    real = Path.write_text

    def fail_on_the_fifth(self: Path, *args: object, **kwargs: object) -> int:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk trouble")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", fail_on_the_fifth)
    with pytest.raises(OSError, match="disk trouble"):
        write_muse_benchmark(tmp_path / "out", authors=40, facts=6, seed=0)
    assert calls["n"] == 5 and list(tmp_path.iterdir()) == []  # no folder, no temporary sibling
