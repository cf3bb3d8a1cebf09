"""The state file is checked when it is read (#13.9): a file that parses but breaks a rule is
refused whole, naming file, line and column; nothing is dropped or repaired."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from skr8tr.conductor import state_file
from skr8tr.conductor.state_file import (
    StateFileError,
    StoredApp,
    StoredHistory,
    StoredRevision,
    StoredState,
)
from tests.conftest import skr8tr_command
from tests.fakes import wait_for
from tests.test_rollout_sim import Harness, manifest

T0 = 1_700_000_000.0
WEB = [f"app web\n  exec /bin/server\n  args --version v{v}\n  replicas 3\n" for v in (1, 2, 3)]
API = 'app = "api"\nexec = "/bin/api"\nreplicas = 2\n\n[env]\nTOKEN = "hunter2"\n'


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


GOOD = StoredState(
    apps=(
        StoredApp("web", 1, 3, 0, 0,
                  tuple(StoredRevision(g, "skr8tr", "/srv/web", sha(t), t)
                        for g, t in zip((1, 2, 3), WEB, strict=True)),
                  (StoredHistory(1, "complete", T0, T0),
                   StoredHistory(2, "rolled_back", T0 + 100, T0 + 160.5),
                   StoredHistory(3, "rolling", T0 + 200, None))),
        StoredApp("api", 1, 2, 4, 1, (StoredRevision(1, "toml", "/srv/api", sha(API), API),),
                  (StoredHistory(1, "complete", T0 + 300, T0 + 300),)),
    ),
    rollouts=({"app": "web", "state": "rolling", "from_generation": 1, "to_generation": 3,
               "replaced": 1, "total": 3, "message": "waiting for web-3-1 to be ready"},))


@pytest.fixture
def good_text(tmp_path: Path) -> str:
    """The file a conductor writes for GOOD (history as inline tables, revisions and
    rollouts as arrays of tables)."""
    state_file.save(str(tmp_path / "written.toml"), GOOD)
    return (tmp_path / "written.toml").read_text()


def load_text(tmp_path: Path, text: str) -> StoredState | None:
    path = tmp_path / "state.toml"
    path.write_text(text)
    return state_file.load(str(path))


def test_what_the_conductor_writes_reads_back_the_same(tmp_path, good_text):
    assert load_text(tmp_path, good_text) == GOOD
    assert load_text(tmp_path, "version = 1\n") == StoredState((), ())


def test_a_clock_stepping_back_never_writes_a_file_that_is_refused(tmp_path):
    app = GOOD.apps[1]
    stepped = StoredApp(app.name, 1, 2, 0, 0, app.revisions,
                        (StoredHistory(1, "complete", T0 + 300, T0 + 299.5),))
    state_file.save(str(tmp_path / "state.toml"), StoredState((stepped,), ()))
    loaded = state_file.load(str(tmp_path / "state.toml"))
    assert loaded.apps[0].history == (StoredHistory(1, "complete", T0 + 300, T0 + 300),)


def with_manifest(old: str, new: str) -> Callable[[str], str]:
    """Change a stored manifest together with its SHA-256 (so only the manifest is wrong)."""
    def change(text: str) -> str:
        quoted_old, quoted_new = json.dumps(old), json.dumps(new)
        assert quoted_old in text and sha(old) in text
        return text.replace(quoted_old, quoted_new, 1).replace(sha(old), sha(new), 1)
    return change


def drop_line(line: str) -> Callable[[str], str]:
    def change(text: str) -> str:
        assert line + "\n" in text
        return text.replace(line + "\n", "", 1)
    return change


# (id, change: (old, new) replaced once or a function, where: the error's spot in the
# changed text marked by ^, what the message says)
BAD = [
    # the four of the issue
    ("desired negative", ("desired = 3", "desired = -5"), "desired = ^-5",
     "app web: desired is -5; expected a whole number 0..1000, as a manifest's replicas"),
    ("desired over the cap", ("desired = 3", "desired = 1500"), "desired = ^1500",
     "app web: desired is 1500; expected a whole number 0..1000"),
    ("unknown history state", ('state = "rolled_back"', 'state = "paused"'),
     'state = ^"paused"', "app web, history of generation 2: state is 'paused'; expected one "
     "of rolling, complete, aborted, failed, rolled_back"),
    ("rollout entry incomplete", drop_line("to_generation = 3"), "[[^rollouts]]",
     "rollout entry #1: to_generation is missing"),
    # apps
    ("desired not whole", ("desired = 3", "desired = 3.0"), "desired = ^3.0",
     "app web: desired is 3.0; expected a whole number 0..1000"),
    ("desired a boolean", ("desired = 3", "desired = true"), "desired = ^true",
     "app web: desired is true"),
    ("desired a string", ("desired = 3", 'desired = "3"'), 'desired = ^"3"',
     "app web: desired is '3'"),
    ("generation zero", ("generation = 1\ndesired = 3", "generation = 0\ndesired = 3"),
     "generation = ^0\ndesired = 3", "app web: generation is 0; expected a whole number >= 1"),
    ("generation without a revision", ("generation = 1\ndesired = 3",
                                       "generation = 9\ndesired = 3"),
     "generation = ^9\ndesired", "app web is at generation 9, which has no stored revision "
     "(stored: 1, 2, 3)"),
    ("completed negative", ("completed = 4", "completed = -1"), "completed = ^-1",
     "app api: completed is -1; expected a whole number >= 0"),
    ("given_up negative", ("given_up = 1", "given_up = -2"), "given_up = ^-2",
     "app api: given_up is -2"),
    ("app name invalid", ("[apps.api]", "[apps.API]"), "[apps.^API]",
     "app name 'API' is not valid; expected [a-z0-9][a-z0-9-]{0,62}"),
    ("app key missing", drop_line("given_up = 0"), "[apps.^web]",
     "app web: given_up is missing"),
    ("app key unknown", ("desired = 3\n", "desired = 3\npaused = true\n"), "^paused = true",
     "app web: unknown key 'paused' (expected generation, desired, completed, given_up, "
     "revisions, history, last_generation)"),
    ("app declared twice", ("[[rollouts]]", "[apps.api]\ndesired = 1\n\n[[rollouts]]"),
     "[apps.api^]\ndesired = 1", "Cannot declare ('apps', 'api') twice"),
    ("apps not a table", lambda t: "version = 1\napps = 3\n", "apps = ^3",
     "apps is a number; expected a table of apps ([apps.NAME])"),
    # revisions
    ("revision sha256 of other text", ('v2\\n  replicas 3\\n"', 'v9\\n  replicas 3\\n"'),
     f"sha256 = ^\"{sha(WEB[1])}\"", "app web, revision of generation 2: sha256 does not "
     "match the stored manifest text, so one of them was edited or damaged"),
    ("revision sha256 not hex", (sha(WEB[0]), sha(WEB[0]).upper()), "sha256 = ^\"76F",
     "app web, revision of generation 1: sha256 is '76F"),
    ("revision generation repeated", ("generation = 3\nformat", "generation = 2\nformat"),
     "generation = ^2\nformat = \"skr8tr\"\nbase_dir = \"/srv/web\"\nsha256 = \"f0",
     "app web: a second revision of generation 2; generations are never reused"),
    ("revision format unknown", ('format = "toml"', 'format = "yaml"'), 'format = ^"yaml"',
     "app api, revision of generation 1: format is 'yaml'; expected one of skr8tr, toml"),
    ("revision base_dir relative", ('base_dir = "/srv/api"', 'base_dir = "srv/api"'),
     'base_dir = ^"srv/api"', "base_dir is 'srv/api'; expected an absolute path"),
    ("revision manifest does not parse", with_manifest(WEB[2], WEB[2] + "  replicas 5000\n"),
     "manifest = ^\"app web\\n  exec /bin/server\\n  args --version v3",
     "app web, revision of generation 3: the stored manifest does not parse (at its line 5, "
     "column"),
    ("revision manifest of another app", with_manifest(WEB[1], WEB[1].replace("web", "www")),
     "manifest = ^\"app www", "the stored manifest is one of app www; expected app web"),
    ("revision key missing", drop_line('base_dir = "/srv/api"'), "[[apps.api.^revisions]]",
     "app api, revision #1: base_dir is missing"),
    ("no revision", lambda t: t[:t.index("[[apps.api.revisions]]")]
     + t[t.index("[[rollouts]]"):], "[apps.^api]", "app api: revisions is missing"),
    ("revisions empty", lambda t: t[:t.index("[[apps.api.revisions]]")].replace(
        "given_up = 1\n", "given_up = 1\nrevisions = []\n") + t[t.index("[[rollouts]]"):],
     "revisions = ^[]", "app api has no revision"),
    # history
    ("history finished before started",
     ("started = 1700000100.0, finished = 1700000160.5",
      "started = 1700000100.0, finished = 1700000060.5"),
     "finished = ^1700000060.5", "app web, history of generation 2: finished is 1700000060.5; "
     "expected Unix seconds not before started (1700000100.0)"),
    ("history finished while rolling",
     ("started = 1700000200.0 }", "started = 1700000200.0, finished = 1700000300.0 }"),
     "started = 1700000200.0, ^finished", "finished is set, but a rolling rollout has not "
     "ended"),
    ("history complete never finished",
     (", finished = 1700000300.0 }", " }"), "    ^{ generation = 1, state = \"complete\", "
     "started = 1700000300.0 }", "app api, history of generation 1: finished is missing"),
    ("history started not a time", ("started = 1700000000.0", "started = nan"),
     "started = ^nan", "started is nan; expected Unix seconds"),
    ("history started negative", ("started = 1700000000.0", "started = -1.0"),
     "started = ^-1.0", "started is -1.0; expected Unix seconds"),
    ("history without revision", ('{ generation = 2, state = "rolled_back"',
                                  '{ generation = 7, state = "rolled_back"'),
     "{ generation = ^7", "app web, history of generation 7: generation 7 has no stored "
     "revision (stored: 1, 2, 3)"),
    ("history generation repeated", ('{ generation = 2, state = "rolled_back"',
                                     '{ generation = 1, state = "rolled_back"'),
     '{ generation = ^1, state = "rolled_back"', "a second history entry for generation 1"),
    ("history entry key unknown", ("state = \"rolling\", started = 1700000200.0 }",
                                   "state = \"rolling\", started = 1700000200.0, by = 1 }"),
     "^by = 1", "unknown key 'by'"),
    # rollouts
    ("rollout state unknown", ('state = "rolling"\nfrom', 'state = "paused"\nfrom'),
     'state = ^"paused"', "rollout of app web: state is 'paused'; expected one of"),
    ("rollout of an unknown app", ('app = "web"', 'app = "www"'), 'app = ^"www"',
     "rollout entry #1: app is 'www', which is not in the state file (apps: web, api)"),
    ("rollout generation unknown", ("to_generation = 3", "to_generation = 4"),
     "to_generation = ^4", "rollout of app web: to_generation 4 has no stored revision"),
    ("rollout replaced over total", ("replaced = 1", "replaced = 4"), "replaced = ^4",
     "rollout of app web: replaced is 4; expected a whole number 0..total (3)"),
    ("rollout total over the cap", ("total = 3", "total = 5000"), "total = ^5000",
     "rollout of app web: total is 5000; expected a whole number 0..1000"),
    ("rollout rolling but history ended", ('{ generation = 3, state = "rolling", '
                                           'started = 1700000200.0 }',
                                           '{ generation = 3, state = "failed", started = '
                                           '1700000200.0, finished = 1700000300.0 }'),
     'state = ^"rolling"\nfrom', "rollout of app web: state is rolling, but the history of "
     "generation 3 is not"),
    ("rollout twice for one app", lambda t: t + t[t.index("[[rollouts]]"):],
     '[[rollouts]]\napp = "web"\nstate = "rolling"\nfrom_generation = 1\nto_generation = 3\n'
     'replaced = 1\ntotal = 3\nmessage = "waiting for web-3-1 to be ready"\n[[rollouts]]\n'
     'app = ^"web"', "rollout entry #2: a second entry for app web; expected one per app"),
    ("rollout message not a string", ('message = "waiting for web-3-1 to be ready"',
                                      "message = 3"), "message = ^3",
     "rollout of app web: message is a number; expected a string"),
    # the document
    ("top-level key unknown", ("version = 1\n", "version = 1\nleader = \"me\"\n"),
     "^leader", "the state file: unknown key 'leader' (expected version, apps, rollouts, "
     "placement_key)"),
    ("placement key not hex", ("version = 1\n", 'version = 1\nplacement_key = "xyz"\n'),
     'placement_key = ^"xyz"', "placement_key is not 64 lowercase hex digits"),
    ("version unsupported", ("version = 1", "version = 2"), "version = ^2",
     "unsupported state version 2 (this conductor reads version 1)"),
    ("version a float", ("version = 1", "version = 1.0"), "version = ^1.0",
     "unsupported state version 1.0"),
]


@pytest.mark.parametrize(("change", "where", "message"), [case[1:] for case in BAD],
                         ids=[case[0] for case in BAD])
def test_a_broken_rule_is_refused_naming_file_line_and_column(tmp_path, good_text, change,
                                                             where, message):
    text = change(good_text) if callable(change) else good_text.replace(*change, 1)
    assert text != good_text
    needle = where.replace("^", "")
    assert text.count(needle) == 1, f"ambiguous spot {where!r}"
    at = text.index(needle) + where.index("^")
    line = text.count("\n", 0, at) + 1
    column = at - (text.rfind("\n", 0, at) + 1) + 1
    with pytest.raises(StateFileError) as info:
        load_text(tmp_path, text)
    shown = str(info.value)
    assert "\n" not in shown
    assert shown.startswith(f"{tmp_path / 'state.toml'}: line {line}, column {column}: "), shown
    assert message in shown


def test_a_message_never_quotes_a_manifest(tmp_path, good_text):
    # The api manifest holds TOKEN = "hunter2"; make it unparseable, then mismatched.
    broken = API.replace("replicas = 2", "replicas = 2000")
    for text in (with_manifest(API, broken)(good_text),
                 good_text.replace(sha(API), sha(broken))):
        with pytest.raises(StateFileError) as info:
            load_text(tmp_path, text)
        assert "hunter2" not in str(info.value)
        assert "TOKEN" not in str(info.value)


def test_spots_are_found_in_any_toml_layout(tmp_path):
    # Hand-written: comments, a multi-line manifest that itself holds `desired = 7` and a
    # `[apps.web]` line, dotted keys, history as an array of tables.
    manifest = 'app = "web"\nexec = "/bin/web"\n# desired = 7\n# [apps.web]\n'
    text = (
        "# edited by hand\n"
        "version = 1\n"
        "\n"
        "[apps.web]  # the only app\n"
        "generation = 1\n"
        f"revisions = [{{ generation = 1, format = 'toml', base_dir = \"/srv\", "
        f"sha256 = \"{sha(manifest)}\", manifest = '''\n{manifest}''' }}]\n"
        "counts.x = 1\n"
        "\n"
        "[[apps.web.history]]\n"
        'generation = 1\nstate = "complete"\nstarted = 1.0\nfinished = 2.0\n'
    )
    with pytest.raises(StateFileError) as info:
        load_text(tmp_path, text.replace("counts.x = 1\n", "desired = -5\ncompleted = 0\n"
                                         "given_up = 0\n"))
    assert ": line 12, column 11: app web: desired is -5" in str(info.value)
    with pytest.raises(StateFileError) as info:
        load_text(tmp_path, text.replace("counts.x = 1\n", "desired = 1\ncompleted = 0\n"
                                         "given_up = 0\n").replace("finished = 2.0",
                                                                   "finished = 0.5"))
    assert ": line 20, column 12: app web, history of generation 1: finished is 0.5" in str(
        info.value)
    ok = text.replace("counts.x = 1\n", "desired = 1\ncompleted = 0\ngiven_up = 0\n")
    assert load_text(tmp_path, ok).apps[0].revisions[0].manifest == manifest


@pytest.mark.e2e
def test_the_conductor_refuses_to_start_on_a_wrong_state_file(tmp_path, good_text):
    state = tmp_path / "state.toml"
    state.write_text(good_text.replace("desired = 3", "desired = -5", 1))
    before = state.read_bytes()
    proc = subprocess.run(
        [*skr8tr_command(), "conductor", "--insecure", "--listen", "127.0.0.1:0", "--http",
         "127.0.0.1:0", "--state", str(state)], capture_output=True, text=True, timeout=30,
        stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(
        f"error: START: {state}: line 5, column 11: app web: desired is -5; expected a "
        "whole number 0..1000, as a manifest's replicas"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert state.read_bytes() == before


async def test_a_conductor_reads_back_what_it_wrote_after_down_and_up(tmp_path, autojump_clock,
                                                                      nursery):
    state = str(tmp_path / "state.toml")
    h = await Harness(nursery, state_path=state).start()
    await h.node("n1")
    await h.run("up", manifest("v1", replicas=2))
    await h.settled(1, 2)
    await h.run("rollout", manifest("v2", replicas=2))
    assert (await h.until_done())["state"] == "complete"
    # Its end is written behind, right after it (loops.serve_store_writes).
    await wait_for(lambda: [r["to_generation"] for r in state_file.load(state).rollouts]
                   == [2], timeout_s=5)
    # The app is removed and deployed again: generation 1 of a new app, no rollout yet.
    await h.run("down", {"app": "web"})
    await h.run("up", manifest("v1", replicas=1))
    stored = state_file.load(state)
    assert [(a.name, a.generation) for a in stored.apps] == [("web", 1)]
    assert stored.rollouts == ()


# ------------------------------------------------------------------ retention (#17)

# web after many restarts: generations 2..10 pruned (their rows keep the manifest's hash),
# 11 current, 12 a restart under way with the scaled count 5.
PRUNED = StoredState(
    apps=(StoredApp("web", 11, 5, 0, 0,
                    (StoredRevision(1, "skr8tr", "/srv/web", sha(WEB[0]), WEB[0]),
                     StoredRevision(11, "skr8tr", "/srv/web", sha(WEB[1]), WEB[1]),
                     StoredRevision(12, "skr8tr", "/srv/web", sha(WEB[1]), WEB[1])),
                    (StoredHistory(1, "complete", T0, T0),
                     StoredHistory(10, "complete", T0 + 10, T0 + 11, sha(WEB[1])),
                     StoredHistory(11, "complete", T0 + 20, T0 + 21),
                     StoredHistory(12, "rolling", T0 + 30, None)),
                    last_generation=12),),
    rollouts=({"app": "web", "state": "rolling", "from_generation": 11, "to_generation": 12,
               "replaced": 2, "total": 5, "message": "waiting", "kind": "restart",
               "desired": 5},))


def test_a_pruned_state_reads_back_the_same(tmp_path):
    state_file.save(str(tmp_path / "state.toml"), PRUNED)
    text = (tmp_path / "state.toml").read_text()
    assert "last_generation = 12" in text and text.count(sha(WEB[1])) == 3
    assert state_file.load(str(tmp_path / "state.toml")) == PRUNED


# Written by the conductor before #17 (an interrupted rollout of generation 2).
OLD_FORMAT = (
    "version = 1\n\n"
    "[apps.web]\ngeneration = 1\ndesired = 4\ncompleted = 0\ngiven_up = 0\n"
    "history = [\n"
    '    { generation = 1, state = "complete", started = 1700000000.0, '
    "finished = 1700000000.0 },\n"
    '    { generation = 2, state = "rolling", started = 1700000100.0 },\n]\n\n'
    "[[apps.web.revisions]]\ngeneration = 1\nformat = \"skr8tr\"\n"
    f'base_dir = "/srv/web"\nsha256 = "{sha(WEB[0])}"\nmanifest = {json.dumps(WEB[0])}\n\n'
    "[[apps.web.revisions]]\ngeneration = 2\nformat = \"skr8tr\"\n"
    f'base_dir = "/srv/web"\nsha256 = "{sha(WEB[0])}"\nmanifest = {json.dumps(WEB[0])}\n\n'
    '[[rollouts]]\napp = "web"\nstate = "rolling"\nfrom_generation = 1\n'
    'to_generation = 2\nreplaced = 1\ntotal = 4\nmessage = "waiting"\n')


def test_a_state_file_from_before_retention_loads(tmp_path):
    # No last_generation, no history hashes, a rollout without kind and desired. It
    # loads as it is; the counter is then the newest stored generation.
    text = OLD_FORMAT
    loaded = load_text(tmp_path, text)
    web = loaded.apps[0]
    assert web.last_generation is None and [h.sha256 for h in web.history] == [None, None]
    assert [r.generation for r in web.revisions] == [1, 2]
    assert "kind" not in loaded.rollouts[0] and "desired" not in loaded.rollouts[0]
    from skr8tr.conductor.tables import app_from_stored
    app = app_from_stored(web, "state.toml")
    assert app.last_generation == 2 and app.desired == 4


RETENTION_BAD = [
    ("last_generation below a stored revision", ("last_generation = 12", "last_generation = 11"),
     "last_generation = ^11", "app web: last_generation is 11; expected a whole number >= 12 "
     "(its newest stored revision): generations are never reused"),
    ("pruned row past last_generation", ("generation = 10\n", "generation = 13\n"),
     "generation = ^13", "app web, history of generation 13: generation 13 has no stored "
     "revision (stored: 1, 11, 12) and is past last_generation 12"),
    ("pruned row without its hash", (f'finished = 1700000011.0\nsha256 = "{sha(WEB[1])}"\n',
                                     "finished = 1700000011.0\n"),
     "[[apps.web.^history]]\ngeneration = 10", "app web, history of generation 10: its "
     "revision was pruned, so its sha256 is expected"),
    ("row hash differs from its revision", ("finished = 1700000000.0\n",
                                            "finished = 1700000000.0\n"
                                            f'sha256 = "{sha(WEB[2])}"\n'),
     f"sha256 = ^\"{sha(WEB[2])}\"", "app web, history of generation 1: sha256 differs from "
     "its stored revision's"),
    ("row hash not hex", (f'sha256 = "{sha(WEB[1])}"\n\n[[apps.web.history]]',
                          'sha256 = "xyz"\n\n[[apps.web.history]]'),
     'sha256 = ^"xyz"', "history of generation 10: sha256 is 'xyz'; expected 64 lowercase"),
    ("rollout kind unknown", ('kind = "restart"', 'kind = "reboot"'), 'kind = ^"reboot"',
     "rollout of app web: kind is 'reboot'; expected one of rollout, undo, restart"),
    ("rollout desired over the cap", ('kind = "restart"\ndesired = 5',
                                      'kind = "restart"\ndesired = 5000'),
     "desired = ^5000", "rollout of app web: desired is 5000; expected a whole number "
     "0..1000"),
]


@pytest.mark.parametrize(("change", "where", "message"),
                         [case[1:] for case in RETENTION_BAD],
                         ids=[case[0] for case in RETENTION_BAD])
def test_retention_fields_that_break_a_rule_are_refused(tmp_path, change, where, message):
    state_file.save(str(tmp_path / "written.toml"), PRUNED)
    good = (tmp_path / "written.toml").read_text()
    text = good.replace(*change, 1)
    assert text != good, good
    at = where.index("^")
    at = text.index(where.replace("^", "")) + at
    line = text.count("\n", 0, at) + 1
    column = at - (text.rfind("\n", 0, at) + 1) + 1
    with pytest.raises(StateFileError) as info:
        load_text(tmp_path, text)
    shown = str(info.value)
    assert shown.startswith(f"{tmp_path / 'state.toml'}: line {line}, column {column}: "), shown
    assert message in shown
