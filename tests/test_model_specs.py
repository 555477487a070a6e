"""Several models, the parts that need no server: RERANKER_MODELS' syntax, each model's settings, the
server's state from its models' states, and which model's path a request takes."""

from __future__ import annotations

import json
import logging

import pytest

from reranker_ops.settings import ModelSpec, Settings, SettingsError, parse_model_specs
from reranker_ops.supervise.states import State


def test_the_list_of_models_and_what_each_overrides():
    specs, problems = parse_model_specs(" DiTy/cross-encoder-russian-msmarco;workers=2 , ./bge;precision=int8;"
                                        "aliases=rerank-multilingual| bge ,")
    assert problems == []
    assert specs == [ModelSpec("DiTy/cross-encoder-russian-msmarco", workers=2),
                     ModelSpec("./bge", precision="int8", aliases=("rerank-multilingual", "bge"))]
    assert specs[0].key == "DiTy_cross-encoder-russian-msmarco" and specs[1].key == "bge"


@pytest.mark.parametrize("text, says", [
    ("a;workers=0", "workers='0'"),
    ("a;workers=two", "workers='two'"),
    ("a;precision=fp64", "precision='fp64'"),
    ("a;threads=0", "threads='0'"),
    ("a;colour=blue", "'colour=blue'"),
    ("a, b;aliases=a", "'a' is given twice"),
    ("a, a", "'a' is given twice"),
    (";workers=1", "names no model"),
])
def test_every_mistake_in_the_list_is_said(text, says):
    with pytest.raises(SettingsError) as err:
        Settings(models=text)
    assert says in str(err.value)


def test_each_model_gets_its_own_settings(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    s = Settings(models="a;workers=3, b;precision=int8;aliases=x, c;threads=1", model_aliases="rerank-v3", workers=1)
    a, b, c = (s.for_model(spec, first=i == 0) for i, spec in enumerate(s.model_specs()))
    # threads: each model's own rule (cores / its workers), as in a server of its own, unless it says
    assert (a.model, a.workers, a.precision, a.effective_threads()) == ("a", 3, "auto", 2)
    assert (b.model, b.workers, b.precision, b.effective_threads()) == ("b", 1, "int8", 8)
    assert c.effective_threads() == 1
    assert Settings(models="a, b", threads=3).for_model(ModelSpec("b")).effective_threads() == 3
    assert a.served_models == ("rerank-v3",) and b.served_models == ("x",)  # the default keeps the server's
    assert a.worker_dir != b.worker_dir and a.worker_dir.parent == s.worker_dir  # a heartbeat folder each
    one = Settings(model="a")
    assert one.model_specs() == [ModelSpec("a")] and one.for_model(ModelSpec("a"), first=True) is one


def _states(*verdicts):
    from reranker_ops.supervise.sdnotify import Notifier
    from reranker_ops.supervise.status import Status

    said: list[str] = []
    notifier = Notifier(None)
    notifier.ready = lambda text: said.append(text)  # type: ignore[method-assign]
    st = Status(notifier, logging.getLogger("t"), lambda: "m", lambda: None)
    for v in verdicts:
        st.derive(v)
        st.serving_ready(v)
    return st.sm, said


def test_the_servers_state_from_its_models():
    R, S, D, F = State.RUNNING, State.STARTING, State.DEGRADED, State.FAILED
    sm, said = _states([("a", S, "loading", False), ("b", S, "loading", False)])
    assert sm.state == S and said == []
    # one model up, the other still loading: the server serves, degraded, and has not said READY yet
    sm, said = _states([("a", R, "", True), ("b", S, "loading the model", False)])
    assert sm.state == D and "b: starting: loading the model" in sm.reason and said == []
    # the other gave up: every model settled, one serves: READY, and the state names the one that is down
    sm, said = _states([("a", R, "", True), ("b", S, "", False)], [("a", R, "", True), ("b", F, "bad IR", False)])
    assert sm.state == D and sm.reason == "b: down: bad IR" and len(said) == 1
    sm, said = _states([("a", R, "", True), ("b", R, "", True)])
    assert sm.state == R
    # never back to starting once the server served: a model that restarts leaves it degraded
    sm, _ = _states([("a", R, "", True), ("b", R, "", True)], [("a", State.RESTARTING, "crash", True),
                                                                ("b", R, "", True)])
    assert sm.state == D and "a: restarting: crash" in sm.reason
    # one model: its state is the server's, as it always was
    sm, _ = _states([("a", S, "", False)], [("a", State.RESTARTING, "crash", False)])
    assert sm.state == State.RESTARTING


class _Source:
    def __init__(self, key, names, down=None):
        self.key, self.ident, self._names, self.down = key, id(self), names, down
        self.settings = Settings()

    def names(self):
        return self._names

    def upstream(self):
        return None


def _body(doc) -> bytearray:
    from reranker_ops.protocol.envelope import PART_HEAD_LEN

    return bytearray(PART_HEAD_LEN) + json.dumps(doc).encode()


def test_which_models_path_a_request_takes():
    from reranker_ops.front.metrics import Metrics
    from reranker_ops.front.router import Router
    from reranker_ops.protocol.envelope import PART_HEAD_LEN

    a, b = _Source("a", ["a", "a-alias"]), _Source("b", ["b", "b-alias"])
    router = Router(Metrics(), logging.getLogger("t"), [a, b])
    pa, pb = router.path("a"), router.path("b")
    assert pa is not pb and pa.scheduler is not pb.scheduler  # each model its own queue and workers
    assert router.route("/rerank", _body({"model": "b-alias", "query": "q", "documents": []})) is pb
    assert router.route("/v1/rerank", _body({"model": "a", "query": "q", "documents": []})) is pa
    assert router.route("/rerank", _body({"query": "q", "documents": ["model"]})) is pa  # names none: default
    assert router.route("/inference", _body([{"query": "q", "passage": "p"}])) is pa
    assert router.route("/rerank", _body({"model": 5})) is pa  # the worker refuses it with its reason
    head = bytearray(PART_HEAD_LEN)
    assert router.route("/rerank", head + b'{"model": "b", ') is pa  # malformed: the same
    deep = head + b'{"model": "b", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    assert router.route("/rerank", deep) is pa  # nested past Python's recursion limit: no crash
    missing = router.route("/rerank", _body({"model": "gpt-4"}))
    assert missing.status == 404 and all(n in missing.text for n in ("a-alias", "b-alias"))
    b.down = "cannot load"
    down = router.route("/rerank", _body({"model": "b"}))
    assert down.status == 503 and "cannot load" in down.text


def test_routing_never_fails_on_any_body():
    """Fuzzed: whatever bytes a body holds (JSON or not, any model name, any nesting), routing answers with a
    model's path, a 404 or a 503, and never raises: the gate reads only ``model``, the worker judges the rest."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from reranker_ops.front.metrics import Metrics
    from reranker_ops.front.router import Router
    from reranker_ops.front.dispatch import Dispatch
    from reranker_ops.protocol.envelope import PART_HEAD_LEN

    router = Router(Metrics(), logging.getLogger("t"), [_Source("a", ["a"]), _Source("b", ["b"], down="x")])
    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                               lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                               max_leaves=20)
    bodies = st.one_of(
        st.binary(max_size=300),
        st.builds(lambda m, rest: json.dumps({"model": m, **rest}).encode(), json_values,
                  st.dictionaries(st.text(max_size=8), json_values, max_size=3)),
        st.builds(lambda m: json.dumps({"model": m}, ensure_ascii=False).encode("utf-8", "surrogatepass"),
                  st.text(max_size=50)),
    )

    @settings(max_examples=400, deadline=None)
    @given(route=st.sampled_from(["/rerank", "/v1/rerank", "/v2/rerank", "/inference"]), body=bodies)
    def check(route, body):
        out = router.route(route, bytearray(PART_HEAD_LEN) + body)
        assert isinstance(out, Dispatch) or out.status in (404, 503)

    check()
