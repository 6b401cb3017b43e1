"""optuna-dashboard reads an evolution's storage: ``optuna-dashboard <out_dir>/evolve_journal.log`` (the default
journal file) or ``optuna-dashboard sqlite:///...`` (``evolve.storage``) shows the evolution's trials.

The storage is opened with the dashboard's own loader (:func:`optuna_dashboard._storage_url.get_storage`, what its
CLI calls on its argument), and the dashboard's JSON API is called through its WSGI app in-process: no server,
no network.
"""

from __future__ import annotations

import json
import wsgiref.util
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from evolve.driver import evolve
from evolve.locations import JOURNAL_NAME
from test_evolve_driver import Recorder, cfg_for, load

optuna_dashboard = pytest.importorskip("optuna_dashboard", reason="pip install -e '.[test]' (or '.[dashboard]')")
from optuna_dashboard._storage_url import get_storage  # noqa: E402  (the loader of the optuna-dashboard CLI)


def api_get(app, path: str):
    """GET ``path`` from the dashboard's WSGI app, in-process."""
    environ: dict = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ.update(REQUEST_METHOD="GET", PATH_INFO=path)
    status = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status and status[0].startswith("200"), (path, status, body[:300])
    return json.loads(body)


def summary(trials) -> list[tuple]:
    return [(t.number, t.state, t.values, t.params, t.user_attrs) for t in sorted(trials, key=lambda t: t.number)]


def check_dashboard_sees(storage_arg: str, res, ours: optuna.Study) -> optuna.Study:
    """The dashboard, given ``storage_arg`` as on its command line, sees the evolution's study as the evolution
    does; returns the study as the dashboard loaded it."""
    storage = get_storage(storage_arg)
    assert [s.study_name for s in storage.get_all_studies()] == [res.study_name]
    seen = optuna.load_study(study_name=res.study_name, storage=storage)
    assert summary(seen.trials) == summary(ours.trials) and seen.trials  # count, states, values, params, attrs
    states = [t.state for t in seen.trials]
    assert states.count(TrialState.COMPLETE) == res.completed and states.count(TrialState.FAIL) == res.failed
    complete = [t for t in seen.trials if t.state == TrialState.COMPLETE]
    assert [(t.number, t.value) for t in complete] == [(r.number, r.fitness) for r in res.rows]  # evolve.csv rows
    assert seen.best_trial.number == res.best_trial and seen.best_value == res.best_fitness

    app = optuna_dashboard.wsgi(storage_arg)  # the same loader, then the dashboard's app
    studies = api_get(app, "/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == [res.study_name]
    detail = api_get(app, f"/api/studies/{studies[0]['study_id']}")
    assert [(t["number"], t["state"], t.get("values")) for t in detail["trials"]] == \
        [(t.number, t.state.name.capitalize(), t.values) for t in seen.trials]
    assert all({p["name"] for p in t["params"]} == set(s.params) for t, s in zip(detail["trials"], seen.trials))
    assert [t["number"] for t in detail["best_trials"]] == [res.best_trial]
    return seen


def test_dashboard_reads_the_journal_file(tmp_path):
    res = evolve(cfg_for(tmp_path, generations=3), train_fn=Recorder(fail_on={1}))  # a FAIL trial too
    journal = tmp_path / JOURNAL_NAME
    assert res.storage == f"journal:{journal.resolve()}" and res.completed == 3 and res.failed == 1
    seen = check_dashboard_sees(str(journal), res, load(tmp_path))
    assert len(seen.trials) == 4

    # a note written from the dashboard (Optuna's journal backend and lock) leaves the evolution able to go on
    optuna_dashboard.save_note(seen, "evolution notes")
    assert not Path(f"{journal}.lock").exists()
    more = evolve(cfg_for(tmp_path, generations=4), train_fn=Recorder())
    assert more.completed == 4 and optuna_dashboard.get_note(load(tmp_path)) == "evolution notes"
    check_dashboard_sees(str(journal), more, load(tmp_path))


def test_dashboard_reads_a_sqlite_storage(tmp_path):
    url = f"sqlite:///{tmp_path / 'evolve.db'}"
    res = evolve(cfg_for(tmp_path / "ev", f"evolve.storage={url}", generations=3), train_fn=Recorder())
    assert res.storage == f"rdb:{url}" and res.completed == 3
    ours = optuna.load_study(study_name=res.study_name, storage=url)
    check_dashboard_sees(url, res, ours)
