"""The journal file as untrusted input: a torn last record (a kill mid-write), hostile or damaged lines."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from evolve import journal, ledger
from evolve.driver import evolve
from fake_train import compose, fake_train
from yolo.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def overrides(out: Path, generations: int) -> list[str]:
    return [f"evolve.out_dir={out}", f"generations={generations}", "mlflow.enabled=false", "evolve.plot=false",
            "epochs=1", "model=yolov5n"]


def run(out: Path, generations: int):
    return evolve(compose(overrides(out, generations)), train_fn=fake_train)


def states(out: Path) -> list[tuple[int, TrialState, float | None]]:
    study = optuna.load_study(study_name="evolve", storage=ledger.open_storage(None, out))
    return [(t.number, t.state, t.value) for t in study.trials]


def lines(out: Path) -> list[bytes]:
    return (out / ledger.JOURNAL_NAME).read_bytes().splitlines(keepends=True)


def test_torn_last_record_is_discarded_before_anything_is_appended(tmp_path, caplog):
    out = tmp_path / "ev"
    run(out, 3)
    before = states(out)
    assert [s for _, s, _ in before] == [TrialState.COMPLETE] * 3
    path = out / ledger.JOURNAL_NAME
    whole = path.read_bytes()
    record = {"op_code": 6, "worker_id": "killed-worker", "trial_id": 1, "state": 4, "values": None,
              "datetime_complete": "2026-01-01T00:00:00.000000"}  # a FAIL of trial 1, cut short by a kill
    torn = json.dumps(record, separators=(",", ":")).encode()[:37]
    path.write_bytes(whole + torn)

    with caplog.at_level(logging.WARNING, logger="yolo.evolve"):
        res = run(out, 5)
    assert res.completed == 5
    assert "discarded a torn last record" in caplog.text
    backups = list(out.glob(ledger.JOURNAL_NAME + ".torn-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == torn
    after = states(out)
    assert after[:3] == before  # no COMPLETE trial failed because of the torn bytes
    assert [s for _, s, _ in after] == [TrialState.COMPLETE] * 5
    assert path.read_bytes().startswith(whole) and all(json.loads(x) for x in lines(out))
    # later runs read the file (ours and Optuna's own reader alike)
    assert run(out, 5).completed == 5
    plain = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    assert len(optuna.load_study(study_name="evolve", storage=plain).trials) == 5


def test_huge_torn_tail_is_discarded_with_bounded_memory(tmp_path):
    out = tmp_path / "ev"
    run(out, 2)
    path = out / ledger.JOURNAL_NAME
    whole = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b'{"op_code":8,"worker_id":"w","trial_id":0,"user_attr":{"x":"' + b"a" * (24 << 20))
    tracemalloc.start()
    try:
        storage = ledger.open_storage(None, out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20
    assert path.read_bytes() == whole
    assert len(optuna.load_study(study_name="evolve", storage=storage).trials) == 2


def test_huge_line_in_the_middle_is_one_clear_error_with_bounded_memory(tmp_path):
    out = tmp_path / "ev"
    run(out, 2)
    ls = lines(out)
    (out / ledger.JOURNAL_NAME).write_bytes(b"".join(ls[:3]) + b"[" * (24 << 20) + b"\n" + b"".join(ls[3:]))
    tracemalloc.start()
    try:
        with pytest.raises(journal.JournalError, match=r"line 4: a line over \d+ bytes"):
            ledger.open_storage(None, out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12 << 20  # the line is 24 MiB; one record may be 4 MiB


@pytest.mark.parametrize("bad", [b"this is not json\n", b'{"op_code": 99, "worker_id": "x"}\n', b"[1, 2]\n",
                                 b"\xff\xfe\n"])
def test_a_line_that_is_not_a_record_is_one_clear_error_naming_it(tmp_path, bad):
    out = tmp_path / "ev"
    run(out, 2)
    ls = lines(out)
    (out / ledger.JOURNAL_NAME).write_bytes(b"".join(ls[:4]) + bad + b"".join(ls[4:]))
    with pytest.raises(journal.JournalError, match=r"evolve_journal.log, line 5: not a journal record") as e:
        run(out, 3)
    assert isinstance(e.value, UserError) and "head -n 4" in str(e.value)


def test_the_command_prints_one_error_line(tmp_path):
    out = tmp_path / "ev"
    out.mkdir()
    (out / ledger.JOURNAL_NAME).write_bytes(b"garbage in the middle\n" + b'{"op_code":0}\n')
    p = subprocess.run([sys.executable, "run_evolve.py", *overrides(out, 1),
                        "evolve.train_fn=fake_train:fake_train"], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ["PYTHONPATH"]])})
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr and "JSONDecodeError" not in p.stderr
    errors = [x for x in p.stderr.splitlines() if x.startswith("ERROR:")]
    assert len(errors) == 1 and "line 1: not a journal record" in errors[0]


def test_a_record_glued_onto_torn_bytes_is_read_with_a_warning(tmp_path, caplog):
    """What appending onto a torn record used to leave: the torn bytes, then a whole record, on one line."""
    out = tmp_path / "ev"
    run(out, 3)
    before = states(out)
    ls = lines(out)
    (out / ledger.JOURNAL_NAME).write_bytes(b"".join(ls[:5]) + b'{"op_code":6,"worker_id":"dead","tri'
                                            + b"".join(ls[5:]))
    with caplog.at_level(logging.WARNING, logger="yolo.evolve"):
        assert states(out) == before
        assert run(out, 4).completed == 4
    assert "line 6: a record written onto the torn bytes" in caplog.text
    assert states(out)[:3] == before


def test_a_record_torn_while_the_storage_is_open_is_cut_before_the_next_append(tmp_path, caplog):
    """Another worker killed mid-write while this one runs: its torn bytes never prefix this one's record."""
    storage = ledger.open_storage(None, tmp_path)
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    study.optimize(lambda t: t.suggest_float("a", 0, 1), n_trials=2)
    path = tmp_path / ledger.JOURNAL_NAME
    with open(path, "ab") as f:
        f.write(b'{"op_code":6,"worker_id":"killed","trial_id":0,"sta')
    with caplog.at_level(logging.WARNING, logger="yolo.evolve"):
        study.set_user_attr("after", 1)
    assert "discarded a torn last record" in caplog.text
    assert all(isinstance(json.loads(x), dict) for x in lines(tmp_path))
    again = optuna.load_study(study_name="s", storage=ledger.open_storage(None, tmp_path))
    assert again.user_attrs == {"after": 1}
    assert [t.state for t in again.trials] == [TrialState.COMPLETE] * 2
