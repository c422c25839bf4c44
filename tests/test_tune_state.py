"""Saved state read whole before a resume: Tune's of a search (uipe/search/tune_state.py), Ray Train's of a fit."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest

from uipe.errors import UipeError
from uipe.search import tune_state


def _session(tune_dir: Path, name: str, trials: int, broken: str = "") -> None:
    """One driver session's files as Tune writes them; `broken`: the template whose file is cut short."""
    texts = {"experiment_state-{}.json": f'{{"trial_data": {list(range(trials))}}}'.encode(),
             "searcher-state-{}.pkl": pickle.dumps({"trials": trials}),
             "search_gen_state-{}.json": pickle.dumps({"counter": trials})}  # a pickle, whatever its name says
    for template, data in texts.items():
        (tune_dir / template.format(name)).write_bytes(data[: len(data) // 2] if template == broken else data)


def test_a_flaw_is_an_empty_file_a_cut_json_or_a_pickle_without_its_stop(tmp_path: Path) -> None:
    f = tmp_path / "experiment_state-x.json"
    f.write_bytes(b"")
    assert tune_state.flaw(f) == "empty"
    f.write_bytes(b'{"trial_data": [1, 2')
    assert tune_state.flaw(f).startswith("not JSON")
    f.write_bytes(b'{"trial_data": [1, 2]}')
    assert tune_state.flaw(f) == ""
    p = tmp_path / "searcher-state-x.pkl"
    whole = pickle.dumps({"study": list(range(100))})
    assert whole.endswith(b".")  # pickle's STOP opcode closes every pickle
    p.write_bytes(whole[:-7])
    assert tune_state.flaw(p) == "a truncated pickle"
    p.write_bytes(whole)
    assert tune_state.flaw(p) == ""
    g = tmp_path / "search_gen_state-x.json"  # Tune pickles this one too
    g.write_bytes(whole)
    assert tune_state.flaw(g) == ""
    g.write_bytes(whole[:-1])
    assert tune_state.flaw(g) == "a truncated pickle"


def test_the_newest_sessions_that_are_not_whole_are_set_aside_down_to_a_whole_one(tmp_path: Path) -> None:
    _session(tmp_path, "2026-12-07_00-41-55", 3)
    _session(tmp_path, "2026-12-07_00-45-10", 6, broken="searcher-state-{}.pkl")
    _session(tmp_path, "2026-12-07_00-50-02", 8, broken="experiment_state-{}.json")
    assert tune_state.sessions(tmp_path) == ["2026-12-07_00-41-55", "2026-12-07_00-45-10", "2026-12-07_00-50-02"]
    lines = tune_state.set_aside_unreadable(tmp_path)
    assert [ln.split(":")[0] for ln in lines] == ["experiment_state-2026-12-07_00-50-02.json",
                                                   "searcher-state-2026-12-07_00-45-10.pkl"]
    assert tune_state.sessions(tmp_path) == ["2026-12-07_00-41-55"]  # what Tune restores: one whole set
    assert len(list((tmp_path / tune_state.SET_ASIDE).iterdir())) == 6  # both later sessions' three files, kept
    assert tune_state.restorable(tmp_path)
    assert tune_state.set_aside_unreadable(tmp_path) == []  # whole now: nothing more moves


def test_with_no_whole_session_the_folder_goes_aside_and_the_trials_start_anew(tmp_path: Path) -> None:
    tune_dir = tmp_path / "tune"
    tune_dir.mkdir()
    _session(tune_dir, "2026-12-07_00-41-55", 8, broken="experiment_state-{}.json")
    tune_state.prepare_resume(tune_dir, "search ga")
    assert not tune_dir.exists()
    [aside] = tmp_path.glob("tune.unreadable-*")
    assert (aside / tune_state.SET_ASIDE / "experiment_state-2026-12-07_00-41-55.json").is_file()


def test_tunes_restore_failure_raises_instead_of_restarting_the_experiment(tmp_path: Path) -> None:
    log = logging.getLogger("ray.tune.execution.tune_controller")
    with pytest.raises(UipeError, match="could not restore the search's saved state .JSONDecodeError"):
        with tune_state.restore_or_fail(tmp_path):
            try:
                import json

                json.loads("")
            except ValueError:
                log.exception(tune_state.RESTORE_FAILED)  # what Tune logs before "Restarting experiment."
    log.error("another error")  # the guard is gone after the block


def test_a_ray_train_run_whose_checkpoint_record_is_not_whole_is_set_aside(tmp_path: Path) -> None:
    """A full disk left Ray Train's record at 0 bytes and every later fit died at start (a chaos run)."""
    from uipe.checkpoint import RAY_TRAIN_SNAPSHOT, set_aside_unreadable_run

    run = tmp_path / "tiny-ga"
    (run / "ga-epoch_01").mkdir(parents=True)
    assert set_aside_unreadable_run(str(tmp_path), "tiny-ga") is None  # no record yet: a fresh run
    (run / RAY_TRAIN_SNAPSHOT).write_text('{"checkpoint_results": []}')
    assert set_aside_unreadable_run(str(tmp_path), "tiny-ga") is None and run.is_dir()
    (run / RAY_TRAIN_SNAPSHOT).write_bytes(b"")
    aside = set_aside_unreadable_run(str(tmp_path), "tiny-ga")
    assert aside is not None and not run.exists() and (aside / "ga-epoch_01").is_dir()
    assert aside.name.startswith("tiny-ga.unreadable-")
    assert set_aside_unreadable_run("s3://bucket/ray", "tiny-ga") is None  # object storage: left to Ray
