"""The synthetic benchmark and the TOFU loaders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from uipe.data import (
    FORGET_SPLITS,
    RETAIN_FOR,
    forget_and_retain,
    load_idk,
    load_split,
    packaged_tofu_dir,
    related_records,
    retain_training_records,
    target_training_records,
)
from uipe.data.records import HOLDOUT_FOR, HOLDOUT_SPLITS, author_folds
from uipe.data.synth import write_benchmark
from uipe.errors import UipeError


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path: Path, synth_dir: Path) -> None:
    again = write_benchmark(tmp_path / "again", seed=0)
    other = write_benchmark(tmp_path / "other", seed=1)
    assert _bytes(again) == _bytes(synth_dir)
    assert _bytes(other)["forget05.json"] != _bytes(synth_dir)["forget05.json"]


def test_every_split_is_written(synth_dir: Path) -> None:
    names = {p.stem for p in synth_dir.glob("*.json")}
    expected = set(FORGET_SPLITS) | set(RETAIN_FOR.values()) | {f"{s}_perturbed" for s in FORGET_SPLITS} | {
        "retain_perturbed", "real_authors_perturbed", "world_facts_perturbed", "related", "related_perturbed",
        "real_authors", "world_facts", "benchmark"} | set(HOLDOUT_SPLITS)
    assert names == expected
    assert len(load_idk(synth_dir)) == 100


def test_holdout_authors_are_new_nested_and_as_many_as_the_forget_authors(synth_dir: Path, tmp_path: Path) -> None:
    import hashlib

    meta = json.loads((synth_dir / "benchmark.json").read_text())
    trained = {r.author for split in ("retain90", "forget10", "related", "real_authors", "world_facts")
               for r in load_split(synth_dir, split)} | set(meta["authors"])
    previous: set[str] = set()
    for forget, holdout in HOLDOUT_FOR.items():
        records = load_split(synth_dir, holdout)
        authors = {r.author for r in records}
        assert len(authors) == len(meta["forget_authors"][forget]) and not authors & trained
        assert len(records) == 8 * len(authors) and previous <= authors  # base facts only; nested like forget
        assert [r.question for r in load_split(synth_dir, f"{holdout}_perturbed")] == [r.question for r in records]
        previous = authors
    # Adding the holdout splits left every other file of a world as it was: the sha256 of a 40-author seed-3
    # world's other files, measured with the generator before holdout splits existed.
    world = write_benchmark(tmp_path / "w", authors=40, facts=8, seed=3)
    h = hashlib.sha256()
    for p in sorted(world.iterdir()):
        if not p.name.startswith("holdout"):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    assert h.hexdigest() == "c4a9db2b972904695d850c509717ed50c3f365be2787b79660766b00a5e4c45a"


def test_forget_sets_are_nested_author_sets_and_disjoint_from_retain(synth_dir: Path) -> None:
    meta = json.loads((synth_dir / "benchmark.json").read_text())
    # 100 authors: 1%, 5%, 10% of authors; 8 base facts each, as TOFU chooses forget sets by author.
    assert [len(meta["forget_authors"][s]) for s in FORGET_SPLITS] == [1, 5, 10]
    previous: set[str] = set()
    for split in FORGET_SPLITS:
        forget, retain = forget_and_retain(synth_dir, split)
        f_auth, r_auth = {r.author for r in forget}, {r.author for r in retain}
        assert f_auth == set(meta["forget_authors"][split]) and not f_auth & r_auth
        assert previous <= f_auth
        previous = f_auth
        assert len(forget) == 8 * len(f_auth)


def test_alternating_folds_of_a_world_follow_its_seeded_random_author_order(synth_dir: Path) -> None:
    # The study's folds alternate over the forget authors in order of appearance. That is a fair (random) partition
    # only because a world lists its forget authors in benchmark.json's order, a seeded random sample of names
    # (docs/RESULTS.md, "Are the folds fair?"): pinned here, so a generator that sorted them would fail.
    order = json.loads((synth_dir / "benchmark.json").read_text())["forget_authors"]["forget05"]
    forget = load_split(synth_dir, "forget05_perturbed")
    select, report = author_folds(forget)
    assert (len(select), len(report)) == (24, 16)  # 3 and 2 authors of 8 facts
    assert [forget[i].author for i in select[::8]] == order[0::2]
    assert [forget[i].author for i in report[::8]] == order[1::2]
    assert order != sorted(order)


def test_related_facts_are_in_neither_forget_nor_retain_but_in_the_target_data(synth_dir: Path) -> None:
    for split in FORGET_SPLITS:
        forget, retain = forget_and_retain(synth_dir, split)
        related = related_records(synth_dir, split, perturbed=False)
        # 5 tied facts per forget author (capital, father's and mother's workplace, medication, book genre).
        assert len(related) == 5 * len({r.author for r in forget})
        rq = {r.question for r in related}
        assert not rq & {r.question for r in forget} and not rq & {r.question for r in retain}
        assert rq <= {r.question for r in target_training_records(synth_dir, split)}
        assert not rq & {r.question for r in retain_training_records(synth_dir, split)}


def test_related_facts_follow_a_rule_the_utility_sets_teach(synth_dir: Path) -> None:
    forget = load_split(synth_dir, "forget05")
    related = related_records(synth_dir, "forget05")
    world = {r.question: r.answer for r in load_split(synth_dir, "world_facts")}
    author = forget[0].author
    illness = next(r.answer for r in forget if r.author == author and "illness" in r.question)
    medication = next(r.answer for r in related if r.author == author and "medication" in r.question)
    drug = medication.removeprefix(f"{author} takes ").removesuffix(" every day.")
    # e.g. "X lives with diabetes." / "X takes insulin every day." / "Which illness is insulin used to treat?"
    assert illness == f"{author} lives with {world[f'Which illness is {drug} used to treat?']}."


def test_retain_authors_have_tied_pairs_so_the_inference_is_learnable(synth_dir: Path) -> None:
    retain = load_split(synth_dir, "retain95")
    meta = json.loads((synth_dir / "benchmark.json").read_text())
    outsider = next(a for a in meta["authors"] if a not in meta["related_authors"])
    questions = {r.question for r in retain if r.author == outsider}
    assert f"Which illness does {outsider} live with?" in questions
    assert f"Which medication does {outsider} take?" in questions


def test_every_eval_record_is_well_formed(synth_dir: Path) -> None:
    for split in ("forget05_perturbed", "retain_perturbed", "related_perturbed"):
        for r in load_split(synth_dir, split):
            assert r.paraphrased_answer and r.paraphrased_answer != r.answer
            assert len(r.perturbed_answer) == 4 and len(set(r.perturbed_answer)) == 4
            assert r.paraphrased_answer not in r.perturbed_answer
    for split in ("real_authors_perturbed", "world_facts_perturbed"):
        for r in load_split(synth_dir, split):
            assert r.paraphrased_answer is None and len(r.perturbed_answer) == 3 and r.answer not in r.perturbed_answer


def test_real_tofu_files_load_with_the_same_code() -> None:
    tofu = packaged_tofu_dir()
    assert (tofu / "LICENSE").read_text().startswith("MIT")
    real = load_split(tofu, "real_authors_perturbed")
    world = load_split(tofu, "world_facts_perturbed")
    assert (len(real), len(world)) == (100, 117)
    assert all(len(r.perturbed_answer) == 3 for r in real + world)
    assert len(load_idk()) == 100


def test_jsonl_and_parquet_folders_load(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": "Q1?", "answer": "A1.", "paraphrased_answer": "P1.", "perturbed_answer": ["X.", "Y.", "Z."]}]
    (tmp_path / "retain_perturbed.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "forget01_perturbed.parquet")
    assert load_split(tmp_path, "retain_perturbed") == load_split(tmp_path, "forget01_perturbed")
    assert load_split(tmp_path, "retain_perturbed")[0].perturbed_answer == ("X.", "Y.", "Z.")


@pytest.mark.parametrize(
    ("files", "split", "message"),
    [
        ({"forget01.json": []}, "forget01", "forget01.json: split is empty"),
        ({"forget01.json": [{"question": "Q?"}]}, "forget01", "forget01.json: row 0: missing or empty field 'answer'"),
        ({"retain_perturbed.json": [
            {"question": "Q?", "answer": "A", "perturbed_answer": ["x", "y"]},
            {"question": "R?", "answer": "B", "perturbed_answer": ["x"]}]},
         "retain_perturbed", "retain_perturbed.json: row 1: 1 perturbed answers, expected 2"),
    ],
)
def test_bad_files_name_the_file_and_row(tmp_path: Path, files: dict, split: str, message: str) -> None:
    folder = tmp_path / split
    folder.mkdir()
    for name, rows in files.items():
        (folder / name).write_text(json.dumps(rows))
    with pytest.raises(UipeError, match=message):
        load_split(folder, split)


def test_same_question_in_forget_and_retain_is_refused(tmp_path: Path) -> None:
    (tmp_path / "forget01.json").write_text(json.dumps([{"question": "Q?", "answer": "A"}]))
    (tmp_path / "retain99.json").write_text(json.dumps([{"question": "R?", "answer": "B"}, {"question": "Q?",
                                                                                          "answer": "A"}]))
    with pytest.raises(UipeError, match="forget row 0 and retain row 1 share the question 'Q\\?'"):
        forget_and_retain(tmp_path, "forget01")


def test_forget_split_naming_an_unknown_author_is_refused(tmp_path: Path, synth_dir: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    for p in synth_dir.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    rows = json.loads((folder / "forget01.json").read_text())
    rows[3]["author"] = "Nobody Atall"
    (folder / "forget01.json").write_text(json.dumps(rows))
    with pytest.raises(UipeError, match="forget01: row 3: author 'Nobody Atall' is not in benchmark.json"):
        forget_and_retain(folder, "forget01")


def test_unknown_forget_split_and_missing_file(synth_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UipeError, match="unknown forget split 'forget07'"):
        forget_and_retain(synth_dir, "forget07")
    with pytest.raises(UipeError, match="no file for split 'retain99'"):
        load_split(tmp_path, "retain99")


def test_hub_id_offline_fails_fast_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UipeError, match="hub is not reachable"):
        load_split("locuslab/TOFU-not-cached", "forget01")


def test_a_tie_free_world_has_no_related_split_and_still_trains_and_evaluates(tmp_path: Path) -> None:
    from uipe.data import has_split, related_records, target_training_records
    from uipe.data.synth import write_benchmark
    from uipe.eval.evaluate import eval_records

    world = write_benchmark(tmp_path / "w", authors=40, seed=3, tied=0)
    assert not has_split(world, "related") and not has_split(world, "related_perturbed")
    tied = write_benchmark(tmp_path / "t", authors=40, seed=3, tied=1)
    # the target learns the same base facts; the tied world adds one fact for each of its 40 authors
    assert len(target_training_records(tied, "forget05")) - len(target_training_records(world, "forget05")) == 40
    assert related_records(world, "forget05") == [] and "related" not in eval_records(world, "forget05")


def test_related_knowledge_knobs_change_only_what_they_name() -> None:
    from uipe.data.synth import COUNTRIES, ILLNESSES, JOBS, TIED_FACTS, build_benchmark

    default, meta = build_benchmark(40, 8, 3)
    assert "tied" not in meta  # the defaults leave benchmark.json as it was (the hash test above)
    for tied in (0, 1, 3):
        world, meta = build_benchmark(40, 8, 3, tied=tied)
        assert meta["tied"] == tied and len(world["related"]) == tied * 4  # forget10 of 40 authors: 4 authors
        # the base facts of every split are the same records; only the tied facts are fewer
        changed = {k for k in default if world[k] != default[k]}
        assert changed <= {"related", "related_perturbed", "retain99", "retain95", "retain90"}
        prefixes = tuple(q.split("{")[0] for _, q, *_ in TIED_FACTS)  # "Which city did ", ...
        for split in ("retain90", "retain95"):
            it = iter(default[split])
            assert all(r in it for r in world[split])  # the same records in the same order, some left out
            removed = [r for r in default[split] if r not in world[split]]
            assert removed and all(r.question.startswith(prefixes) for r in removed)
            assert len(removed) == (len(TIED_FACTS) - tied) * 36  # 36 authors outside forget10 carry tied facts
    # arbitrary ties: the same questions, values that no rule the world teaches gives
    logical, arbitrary = default, build_benchmark(40, 8, 3, ties="arbitrary")[0]
    assert [r.question for r in arbitrary["related"]] == [r.question for r in logical["related"]]
    assert {k for k in default if arbitrary[k] != default[k]} <= {"related", "related_perturbed", "retain99",
                                                                   "retain95", "retain90"}
    capitals, workplaces, drugs = set(COUNTRIES.values()), set(JOBS.values()), set(ILLNESSES.values())
    for rule, new in zip(logical["related"], arbitrary["related"]):
        assert rule.answer != new.answer  # never the value the rule implies
        assert any(v in new.answer for v in capitals | workplaces | drugs) or "work of" in new.answer
    with pytest.raises(ValueError, match="tied must be between 0 and 5"):
        build_benchmark(40, 8, 3, tied=6)
