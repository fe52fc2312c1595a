"""What a config or a checkpoint can make the program do, tried as an attacker and as a careless user would.

A section's `type` must resolve to an object of that section's kind before anything is built, whether the config
comes from the user or from a checkpoint. Every wrongly typed, out-of-range or non-finite value, in the declared
settings or in any argument of a class the config names, ends in exit code 2, one line, nothing written. So does
every crafted field of a checkpoint given to train.py or test.py, unless the run can resume it correctly.
"""
import contextlib
import copy
import dataclasses
import importlib
import inspect
import io
import json
import math
import shutil
import tempfile
import typing
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import train
from tests.helpers import error_line, evaluate, make_config, run_dirs, write_config
from utils.config import resolve
from utils.settings import RunSettings, TrainerSettings
from utils.util import UserError

POPEN = "torch.distributed.elastic.multiprocessing.subprocess_handler.subprocess_handler.Popen"
HOSTILE = [  # (section, type, args): each would run a command or touch a file if it were built
    ("arch", POPEN, {"args": ["touch", "{pwned}"]}),
    ("loss", POPEN, {"args": ["touch", "{pwned}"]}),
    ("optimizer", "torch.serialization.save", {"f": "{pwned}"}),
    ("lr_scheduler", "torch.hub.download_url_to_file", {"url": "file:///etc/hostname", "dst": "{pwned}"}),
    ("arch", "torch.hub.download_url_to_file", {"url": "file:///etc/hostname", "dst": "{pwned}"}),
    ("arch", "torchvision.utils.save_image", {"tensor": [[1.0]], "fp": "{pwned}"}),
    ("loss", "utils.util.write_text", {"text": "x", "path": "{pwned}"}),
    ("data_loader", "torch.utils.tensorboard.SummaryWriter", {"log_dir": "{pwned}"}),
]


def hostile_config(data_dir, save_dir, section, type_name, args, pwned):
    config = make_config(data_dir, save_dir)
    spec = {"type": type_name, "args": json.loads(json.dumps(args).replace("{pwned}", str(pwned)))}
    config[section] = spec
    return config


def assert_refused_without_effect(code, capsys, pwned, section):
    err = capsys.readouterr().err
    assert code == 2, err
    assert not pwned.exists(), f"a {section} type ran its effect"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {section}"), err


@pytest.mark.parametrize("section, type_name, args", HOSTILE, ids=[f"{s}-{t.rsplit('.', 1)[1]}" for s, t, _ in HOSTILE])
def test_a_config_builds_nothing_but_its_sections_kind(section, type_name, args, data_slice, tmp_path, capsys):
    pwned = tmp_path / "pwned"
    config = hostile_config(data_slice, tmp_path / "saved", section, type_name, args, pwned)
    code = train.main(["-c", str(write_config(config, tmp_path / "config.json"))])
    assert_refused_without_effect(code, capsys, pwned, section)
    assert not (tmp_path / "saved").exists()


@pytest.mark.parametrize("script", ["train.py", "test.py"])
@pytest.mark.parametrize("section, type_name, args", HOSTILE[:3], ids=["arch-Popen", "loss-Popen", "optimizer-save"])
def test_a_checkpoint_builds_nothing_but_its_sections_kind(script, section, type_name, args, data_slice, tmp_path,
                                                           capsys):
    """A checkpoint from elsewhere (a forum, a teammate) loads with weights_only, and its config is checked exactly
    like a user's."""
    pwned = tmp_path / "pwned"
    config = hostile_config(data_slice, tmp_path / "saved", section, type_name, args, pwned)
    model = tmp_path / "model.pth"
    torch.save({"state_dict": {}, "config": config, "epoch": 1, "batches_done": 0, "global_step": 1}, model)
    code = (train.main if script == "train.py" else evaluate)(["-r", str(model)])
    assert_refused_without_effect(code, capsys, pwned, section)


# --- every public class and function of torch's namespaces, by section ----------------------------------------------

NAMESPACES = ["torch", "torch.nn", "torch.nn.functional", "torch.optim", "torch.optim.lr_scheduler", "torch.utils.data",
              "torch.hub", "torch.serialization", "torch.multiprocessing", "torch.distributed.elastic.multiprocessing",
              "torch.distributed.elastic.multiprocessing.subprocess_handler.subprocess_handler", "torchvision.models",
              "torchvision.datasets", "torchvision.io", "torchvision.utils", "torchvision.transforms.v2",
              "utils.util", "utils.checkpoint", "model.model", "model.loss", "model.metric", "model.optim",
              "data_loader.data_loaders"]


def walked_objects():
    """(dotted name, object) of every public class and function in NAMESPACES."""
    found = {}
    for module_name in NAMESPACES:
        for name, obj in vars(importlib.import_module(module_name)).items():
            if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)):
                found.setdefault(f"{module_name}.{name}", obj)
    return found


def under(obj, *prefixes):
    module = getattr(obj, "__module__", "") or ""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def subclass(obj, *bases):
    return inspect.isclass(obj) and issubclass(obj, bases)


KIND = {  # what each section may build, written independently of the implementation
    "arch": lambda o: subclass(o, torch.nn.Module) or inspect.isfunction(o) and under(o, "torchvision.models", "model"),
    "loss": lambda o: subclass(o, torch.nn.Module) or inspect.isfunction(o) and under(o, "torch.nn.functional",
                                                                                       "model.loss"),
    "optimizer": lambda o: subclass(o, torch.optim.Optimizer),
    "lr_scheduler": lambda o: subclass(o, torch.optim.lr_scheduler.LRScheduler,
                                       torch.optim.lr_scheduler.ReduceLROnPlateau),
    "data_loader": lambda o: subclass(o, torch.utils.data.DataLoader) and under(o, "data_loader", "base"),
}


@pytest.mark.parametrize("section", list(KIND))
def test_every_object_of_another_kind_is_refused_before_it_is_built(section):
    walked = walked_objects()
    accepted = []
    for dotted in walked:
        try:
            resolve(section, dotted)
        except UserError:
            continue
        accepted.append(dotted)
    wrongly = [d for d in accepted if not KIND[section](walked[d])]
    assert wrongly == [], f"{section} accepts objects of another kind"
    assert len(walked) > 500 and accepted, "the walk found too little to mean anything"


# --- wrong values, drawn ------------------------------------------------------------------------------------------

def wrong_values(kind, minimum=None):
    """JSON values that are not of `kind`, or below its minimum."""
    anything_else = st.one_of(st.text(max_size=5), st.booleans(), st.lists(st.integers(), max_size=2), st.none(),
                              st.dictionaries(st.text(max_size=3), st.integers(), max_size=1))
    if typing.get_origin(kind) is typing.Literal:
        return st.one_of(anything_else, st.text(max_size=8)).filter(lambda v: v not in typing.get_args(kind))
    if kind is bool:
        return st.one_of(st.integers(), st.text(max_size=5), st.none(), st.floats())
    if kind is int:
        below = st.integers(max_value=minimum - 1) if minimum is not None else st.nothing()
        return st.one_of(anything_else.filter(lambda v: not (isinstance(v, int) and not isinstance(v, bool))),
                         st.floats().filter(lambda v: not v.is_integer() if math.isfinite(v) else True), below)
    if kind is float:
        below = st.floats(max_value=minimum, exclude_max=True) if minimum is not None else st.nothing()
        return st.one_of(anything_else, st.sampled_from([math.nan, math.inf, -math.inf]), below)
    if kind is str:
        return st.one_of(st.integers(), st.floats(), st.booleans(), st.none(), st.lists(st.text(max_size=2)))
    return anything_else.filter(lambda v: not isinstance(v, kind))


def declared(declaration):
    return [(f.name, f.type, f.metadata.get("minimum")) for f in dataclasses.fields(declaration)
            if f.type in (int, float, bool, str) or typing.get_origin(f.type) is typing.Literal]


def mistakes_in(declaration, prefix):
    return st.sampled_from(declared(declaration)).flatmap(
        lambda field: wrong_values(field[1], field[2]).map(lambda value: (prefix + field[0], value)))


def argument_mistakes():
    """A wrongly typed value for an argument of a class the small config names, judged by its default's type."""
    import model.model
    from data_loader.data_loaders import CsvImageDataLoader

    classes = {"arch.args.": model.model.ConvNet, "data_loader.args.": CsvImageDataLoader,
               "optimizer.args.": torch.optim.AdamW}
    plain = [(prefix + p.name, type(p.default)) for prefix, cls in classes.items()
             for p in inspect.signature(cls).parameters.values()
             if type(p.default) in (int, float, bool, str) and p.name not in ("training", "seed")]
    return st.sampled_from(plain).flatmap(lambda item: wrong_values(item[1]).map(lambda v: (item[0], v)))


def run_with(data_dir, key, value):
    """train.py -c on the small config with `key` set to `value`: (exit code, stderr, whether save_dir exists)."""
    with tempfile.TemporaryDirectory() as folder:
        config = make_config(data_dir, Path(folder) / "saved")
        *parents, last = key.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
        path = Path(folder) / "config.json"
        path.write_text(json.dumps(config))  # NaN and infinity are written as JSON's non-standard tokens
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = train.main(["-c", str(path)])
        return code, err.getvalue(), (Path(folder) / "saved").exists()


def assert_one_line_exit_2(data_dir, key, value):
    code, err, wrote = run_with(data_dir, key, value)
    assert code == 2, f"{key}={value!r}: exit code {code}\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, f"{key}={value!r}:\n{err}"
    assert not wrote, f"{key}={value!r} created save_dir"


PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(mistake=st.one_of(mistakes_in(TrainerSettings, "trainer."), mistakes_in(RunSettings, "")))
def test_a_wrong_setting_is_one_line_and_exit_2(data_slice, mistake):
    assert_one_line_exit_2(data_slice, *mistake)


@PROPERTY
@given(mistake=argument_mistakes())
def test_a_wrong_argument_of_a_named_class_is_one_line_and_exit_2(data_slice, mistake):
    assert_one_line_exit_2(data_slice, *mistake)


# --- code a user brings ---------------------------------------------------------------------------------------------

def test_a_model_builder_from_an_import_root_trains(data_slice, tmp_path, monkeypatch):
    """`"type": "<package>.create_model"` with the package in import_roots, as timm is used."""
    package = tmp_path / "zoo"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from model.model import ConvNet\n\n\n"
        "def create_model(name, num_classes):\n"
        "    assert name == 'small'\n"
        "    return ConvNet(num_classes=num_classes, width=4)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = make_config(data_slice, tmp_path / "saved", epochs=1, limit_train_batches=1)
    config["import_roots"] = ["zoo"]
    config["arch"] = {"type": "zoo.create_model", "args": {"name": "small", "num_classes": 10}}
    assert train.main(["-c", str(write_config(config, tmp_path / "config.json"))]) == 0


def test_a_metric_function_is_refused_at_the_check(data_slice, tmp_path, capsys, monkeypatch):
    """victoresque's `def accuracy(output, target)` in model/metric.py would be a batch average: refused, and it
    does not silently replace the template's metric of that name."""
    import model.metric

    def accuracy(output, target):
        return (output.argmax(dim=1) == target).float().mean()

    accuracy.__module__ = "model.metric"  # as if written in that file
    monkeypatch.setattr(model.metric, "accuracy", accuracy)
    config = make_config(data_slice, tmp_path / "saved")
    code = train.main(["-c", str(write_config(config, tmp_path / "config.json"))])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: metrics[0].type: 'accuracy' is not a metric"), err
    assert not (tmp_path / "saved").exists()


# --- a checkpoint from elsewhere: every field crafted -----------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_states(data_slice, tmp_path_factory):
    """A short real run (EMA, top-k, a checkpoint every epoch and every 2 steps): the end of epoch 1 of 2, and a
    mid-epoch checkpoint of epoch 1, kept aside as it is written."""
    import base.base_trainer

    base_dir = tmp_path_factory.mktemp("saved_states")
    config = make_config(data_slice, base_dir / "saved", epochs=2, save_period=1, save_every_n_steps=2,
                         limit_train_batches=3, limit_val_batches=1, ema_decay=0.9, save_top_k=1)
    mid_epoch = base_dir / "mid-epoch.pth"
    save = base.base_trainer.save_checkpoint

    def keep_mid_epoch(state, path):
        if state["batches_done"] and not mid_epoch.exists():
            save(state, mid_epoch)
        save(state, path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(base.base_trainer, "save_checkpoint", keep_mid_epoch)
        assert train.main(["-c", str(write_config(config, base_dir / "config.json"))]) == 0
    (run,) = (base_dir / "saved" / "tiny").iterdir()
    return {"end": torch.load(run / "checkpoint-epoch1.pth", weights_only=True),
            "mid": torch.load(mid_epoch, weights_only=True), "config": config}


def crafted(states, source, change, path):
    """A copy of a saved state whose runs go under path's folder, changed by `change`, saved to `path`."""
    state = copy.deepcopy(states[source])
    state["config"]["trainer"]["save_dir"] = str(path.parent / "saved")
    change(state)
    torch.save(state, path)
    return path


def first_key(state):
    return next(iter(state))


@dataclasses.dataclass
class Crafted:
    """A saved state with one field changed, and the command given it."""
    id: str
    field: str  # what the error line must name
    change: typing.Callable
    source: str = "end"  # "end": the end of epoch 1; "mid": inside epoch 1 after 2 batches
    command: str = "resume"  # resume, fine-tune, test, test-ema, resume-in-run-folder


def set_field(**fields):
    return lambda state: state.update(fields)


def set_in(*keys, value):
    """Set the value at a path of keys; a callable key is given the container it indexes (e.g. `first_key`)."""
    def change(state):
        for key in keys[:-1]:
            state = state[key(state) if callable(key) else key]
        state[keys[-1](state) if callable(keys[-1]) else keys[-1]] = value
    return change


CRAFTED = [
    Crafted("epoch-negative", "epoch", set_field(epoch=-5)),
    Crafted("epoch-a-string", "epoch", set_field(epoch="1")),
    Crafted("epoch-past-its-run", "epoch", set_field(epoch=3)),
    Crafted("global-step-a-string", "global_step", set_field(global_step="6")),
    Crafted("global-step-negative", "global_step", set_field(global_step=-1)),
    Crafted("batches-done-negative", "batches_done", set_field(batches_done=-1), "mid"),
    Crafted("batches-done-past-the-epoch", "batches_done", set_field(batches_done=3), "mid"),
    Crafted("batches-done-a-bool", "batches_done", set_field(batches_done=True), "mid"),
    Crafted("epoch-lr-a-string", "epoch_lr", set_field(epoch_lr="0.001"), "mid"),
    Crafted("rng-a-list", "rng", set_field(rng=[1, 2])),
    Crafted("rng-python-short", "rng.python", set_in("rng", "python", value=(3, (1, 2), None))),
    Crafted("rng-numpy-position", "rng.numpy", set_in("rng", "numpy", 2, value=-1)),
    Crafted("rng-torch-wrong-size", "rng.torch", set_in("rng", "torch", value=torch.zeros(10, dtype=torch.uint8))),
    Crafted("train-metrics-floats", "train_metrics", set_field(train_metrics={"loss_sum": 1.0, "count": 64,
                                                                              "totals": {}}), "mid"),
    Crafted("train-metrics-wrong-shape", "train_metrics.totals.accuracy",
            set_in("train_metrics", "totals", "accuracy", value=torch.zeros(1, dtype=torch.int64)), "mid"),
    Crafted("monitor-best-a-string", "monitor_best", set_field(monitor_best="0.5")),
    Crafted("monitor-best-nan", "monitor_best", set_field(monitor_best=math.nan)),
    Crafted("not-improved-count-a-float", "not_improved_count", set_field(not_improved_count=1.5)),
    Crafted("top-k-short-entry", "top_k", set_field(top_k=[[0.5]])),
    Crafted("optimizer-state-wrong-shape", "optimizer.state.0.exp_avg",
            set_in("optimizer", "state", 0, "exp_avg", value=torch.zeros(3))),
    Crafted("optimizer-lr-a-string", "optimizer.param_groups[0].lr",
            set_in("optimizer", "param_groups", 0, "lr", value="fast")),
    Crafted("optimizer-a-number", "optimizer", set_field(optimizer=5)),
    Crafted("lr-scheduler-a-list", "lr_scheduler", set_field(lr_scheduler=[1])),
    Crafted("lr-scheduler-step-a-string", "lr_scheduler.last_epoch", set_in("lr_scheduler", "last_epoch", value="3")),
    Crafted("lr-scheduler-extra-attribute", "lr_scheduler.optimizer", set_in("lr_scheduler", "optimizer", value=1)),
    Crafted("scaler-a-string", "scaler", set_field(scaler="on")),
    Crafted("ema-wrong-shape", "ema_state_dict", set_in("ema_state_dict", first_key, value=torch.zeros(2))),
    Crafted("ema-not-tensors", "ema_state_dict", set_in("ema_state_dict", first_key, value="w")),
    Crafted("weights-not-tensors", "state_dict", set_in("state_dict", first_key, value=1.0)),
    Crafted("weights-a-list", "state_dict", set_field(state_dict=[1])),
    Crafted("fine-tune-weights-not-tensors", "state_dict", set_in("state_dict", first_key, value=1.0),
            command="fine-tune"),
    Crafted("test-weights-not-tensors", "state_dict", set_in("state_dict", first_key, value="w"), command="test"),
    Crafted("test-weights-complex", "features.0.weight", set_in("state_dict", first_key, value=torch.zeros(
        8, 1, 3, 3, dtype=torch.complex64)), command="test"),
    Crafted("test-ema-not-a-dict", "ema_state_dict", set_field(ema_state_dict="w"), command="test-ema"),
    Crafted("test-ema-not-tensors", "ema_state_dict", set_in("ema_state_dict", first_key, value=[1.0]),
            command="test-ema"),
    Crafted("last-global-step-a-string", "global_step", set_field(global_step="6"), command="resume-in-run-folder"),
]


def prepare(case, states, folder):
    """The case's crafted files in `folder`: (the script's main, its arguments, the file the error must name)."""
    if case.command == "resume-in-run-folder":  # the run's checkpoint-last.pth is crafted; its best one resumed
        (folder / "run").mkdir()
        last = crafted(states, case.source, case.change, folder / "run" / "checkpoint-last.pth")
        best = crafted(states, "end", lambda state: None, folder / "run" / "model_best.pth")
        return train.main, ["-r", str(best)], last
    path = crafted(states, case.source, case.change, folder / "crafted.pth")
    if case.command == "fine-tune":
        config = make_config(states["config"]["data_loader"]["args"]["data_dir"], folder / "saved")
        return train.main, ["-r", str(path), "-c", str(write_config(config, folder / "config.json"))], path
    if case.command.startswith("test"):
        return evaluate, ["-r", path, *(["--ema"] if case.command == "test-ema" else [])], path
    return train.main, ["-r", str(path)], path


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("case", CRAFTED, ids=[case.id for case in CRAFTED])
def test_a_crafted_checkpoint_field_is_one_line_naming_it(case, saved_states, tmp_path, capsys):
    main, argv, path = prepare(case, saved_states, tmp_path)
    before = files_under(tmp_path)
    code = main(argv)
    line = error_line(capsys)
    assert code == 2 and str(path) in line and case.field in line, line
    assert files_under(tmp_path) == before



def test_ema_turned_on_at_resume_starts_at_the_checkpoints_weights(saved_states, tmp_path):
    """A checkpoint without EMA weights, resumed with EMA on: the average starts at the weights resumed (with a
    decay this close to 1 it stays there), not at the freshly built model's."""
    path = crafted(saved_states, "end", set_field(ema_state_dict=None), tmp_path / "without-ema.pth")
    assert train.main(["-r", str(path), "-o", "trainer.ema_decay=0.999999"]) == 0
    (run,) = (tmp_path / "saved" / "tiny").iterdir()
    ema = torch.load(run / "checkpoint-last.pth", weights_only=True)["ema_state_dict"]
    resumed = {k: v for k, v in saved_states["end"]["state_dict"].items() if v.is_floating_point()}
    assert all(torch.allclose(ema[name], weights, atol=1e-4) for name, weights in resumed.items())

REMOVED = object()  # stands for a field taken out of the checkpoint
PLAIN_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70), st.floats(), st.text(max_size=4),
    st.lists(st.one_of(st.integers(-3, 3), st.floats()), max_size=3),
    st.dictionaries(st.sampled_from(["lr", "state", "python", "loss_sum"]), st.integers(-3, 3), max_size=2),
    st.builds(torch.zeros, st.integers(0, 3)), st.just(REMOVED))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), value=PLAIN_VALUES)
def test_any_field_of_a_checkpoint_replaced_resumes_correctly_or_is_one_line(saved_states, data, value):
    """A mid-epoch checkpoint with one field replaced by a plain value (or removed): either refused with one line
    naming the file and the field, nothing written, or resumed to the end of the run."""
    field = data.draw(st.sampled_from(sorted(set(saved_states["mid"]) - {"config"})), label="field")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        change = (lambda state: state.pop(field)) if value is REMOVED else set_field(**{field: value})
        path = crafted(saved_states, "mid", change, folder / "crafted.pth")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = train.main(["-r", str(path)])
        if code == 2:
            lines = err.getvalue().strip().splitlines()
            assert len(lines) == 1 and str(path) in lines[0] and field in lines[0], err.getvalue()
            assert files_under(folder) == ["crafted.pth"]
        else:
            assert code == 0 and "Traceback" not in err.getvalue(), err.getvalue()
            (run,) = (folder / "saved" / "tiny").iterdir()
            last = torch.load(run / "checkpoint-last.pth", weights_only=True)
            assert (last["epoch"], last["batches_done"]) == (2, 0)


# --- the checkpoint boundary: what loading a checkpoint reads, fetches and allocates ---------------------------------

def set_config(key, value):
    """A change that sets the dotted `key` of a checkpoint's config."""
    def change(state):
        node = state["config"]
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return change


@pytest.mark.parametrize("key, value, culprit", [
    ("inference.sample_submission", "http://127.0.0.1:9/sample.csv", "URL"),
    ("data_loader.args.test_csv", "../../../../../../../../etc/passwd", "outside"),
    ("data_loader.args.cache_dir", "/tmp/../var/tmp/elsewhere", "outside"),
    ("data_loader.args.data_dir", "/", "root"),
    ("data_loader.args.data_dir", "{folder}/made/by/the/checkpoint", "no folder"),
], ids=["url", "test-csv-outside", "cache-dir-outside", "root", "missing-data-dir"])
@pytest.mark.parametrize("script", ["test", "resume"])
def test_a_checkpoint_reaches_nothing_outside_its_folders(script, key, value, culprit, saved_states, tmp_path,
                                                          capsys):
    """A path only the checkpoint names must lie in its run folder, its data folder or the working folder: no URL
    is fetched, no file elsewhere read (or echoed), no folder made."""
    path = crafted(saved_states, "end", set_config(key, value.replace("{folder}", str(tmp_path))),
                   tmp_path / "crafted.pth")
    code = evaluate(["-r", path, "--out", tmp_path / "out"]) if script == "test" else train.main(["-r", str(path)])
    line = error_line(capsys)
    assert code == 2 and key in line and culprit in line and "root:" not in line, line
    assert files_under(tmp_path) == ["crafted.pth"]


SECRET = "s3cr3t"
CELLS = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=8).map(
    lambda text: f"{text}{SECRET}")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.lists(CELLS, min_size=1, max_size=3, unique=True), rows=st.lists(st.lists(CELLS, max_size=4),
       min_size=1, max_size=4), key=st.sampled_from(["train_csv", "test_csv"]), id_known=st.booleans(),
       script=st.sampled_from(["test", "resume"]))
def test_no_line_quotes_a_file_that_only_a_checkpoint_names_outside_its_folders(saved_states, header, rows, key,
                                                                                id_known, script):
    """A checkpoint may name a data folder elsewhere (say /etc, with passwd as its CSV, even its first line as the
    id column): the run reads it as data, and whatever fails, no printed line shows what the file holds."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "private").mkdir()
        (folder / "run").mkdir()
        id_column = "id" if id_known else "name"
        lines = [[id_column, *header] if id_known else header] + rows
        (folder / "private" / "file.csv").write_text("\n".join(",".join(line) for line in lines) + "\n")

        def elsewhere(state):
            state["config"]["data_loader"]["args"].update(
                {"data_dir": str(folder / "private"), key: "file.csv", "id_column": id_column})

        path = crafted(saved_states, "end", elsewhere, folder / "run" / "crafted.pth")
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = evaluate(["-r", path, "--out", folder / "out"]) if script == "test" else \
                train.main(["-r", str(path)])
        assert code == 2 and SECRET not in out.getvalue() + err.getvalue(), out.getvalue() + err.getvalue()
        assert len(err.getvalue().strip().splitlines()) == 1, err.getvalue()


@pytest.mark.parametrize("save_dir, name, beside", [("{folder}/elsewhere", "tiny", False), ("{folder}", "tiny", True),
                                                    ("/", "tmp", False), ("http://127.0.0.1:9/saved", "tiny", False)])
def test_a_resumed_checkpoint_saves_and_reports_only_in_its_own_folder(save_dir, name, beside, saved_states,
                                                                       tmp_path):
    """An older checkpoint resumes into a new run folder beside its run when it names the save folder its run lies
    in (`<save_dir>/<name>/<run>`), else inside its own folder, never at the root (a run folder /tmp/<run> whose
    checkpoint says name "tmp", save_dir "/"); it starts none of the trackers it names (those are the user's)."""
    run = Path(tempfile.mkdtemp(dir="/tmp")) if name == "tmp" else tmp_path / name / "0101_000000"
    run.mkdir(parents=True, exist_ok=True)

    def elsewhere(state):
        state["config"]["trainer"].update(save_dir=save_dir.format(folder=tmp_path), trackers=["csv", "mlflow"],
                                          mlflow_uri=f"sqlite:///{tmp_path / 'elsewhere.db'}")
        state["config"]["name"] = name

    try:
        path = crafted(saved_states, "end", elsewhere, run / "checkpoint-epoch1.pth")
        before = set(Path("/tmp").iterdir())
        assert train.main(["-r", str(path)]) == 0
        (new,) = set(run_dirs(tmp_path)) - {run} if beside else run_dirs(run, name)
        assert (new / "checkpoint-last.pth").exists() and set(Path("/tmp").iterdir()) == before
        assert json.loads((new / "config.json").read_text())["trainer"]["trackers"] == []  # it named csv and mlflow
    finally:
        if name == "tmp":
            shutil.rmtree(run)


def test_a_path_the_user_gives_for_a_checkpoint_is_used(saved_states, data_slice, tmp_path, capsys):
    """The same path given on the command line is the user's choice: used."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "test.csv").write_text((data_slice / "test.csv").read_text())
    path = crafted(saved_states, "end", lambda state: None, tmp_path / "crafted.pth")
    assert evaluate(["-r", path, "--out", tmp_path / "out", "-o",
                     f"data_loader.args.test_csv={outside / 'test.csv'}"]) == 0
    assert (tmp_path / "out" / "predictions.csv").exists()


def test_a_checkpoint_naming_pretrained_weights_downloads_nothing(saved_states, tmp_path, monkeypatch):
    """`weights: DEFAULT` in a checkpoint's config: its own weights replace them, so none are fetched."""
    import torch.hub

    from model.model import TorchvisionClassifier

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, *a, **k: pytest.fail(f"downloaded {url}"))
    arch = {"type": "TorchvisionClassifier", "args": {"name": "mobilenet_v3_small", "num_classes": 10,
                                                      "in_channels": 1, "weights": "DEFAULT"}}
    model = TorchvisionClassifier(**{**arch["args"], "weights": None})

    def pretrained(state):
        state["config"]["arch"] = arch
        state["state_dict"] = model.state_dict()
        state.pop("ema_state_dict", None)

    path = crafted(saved_states, "end", pretrained, tmp_path / "crafted.pth")
    assert evaluate(["-r", path, "--out", tmp_path / "out"]) == 0
    assert (tmp_path / "out" / "predictions.csv").exists() and not (tmp_path / "torch-home").exists()


def test_a_compressed_checkpoint_is_refused_before_it_is_read(saved_states, tmp_path, capsys):
    """torch.save stores its records uncompressed; a compressed one could unpack to far more than the file holds."""
    import zipfile

    plain = crafted(saved_states, "end", lambda state: None, tmp_path / "plain.pth")
    path = tmp_path / "packed.pth"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as packed:
        for record in source.infolist():
            packed.writestr(record.filename, source.read(record))
    plain.unlink()
    assert train.main(["-r", str(path)]) == 2
    line = error_line(capsys)
    assert str(path) in line and "compressed" in line, line
    assert files_under(tmp_path) == ["packed.pth"]


def nested(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


def test_a_deeply_nested_checkpoint_or_config_is_one_line(saved_states, data_slice, tmp_path, capsys):
    path = crafted(saved_states, "end", set_config("trainer.note", nested(200)), tmp_path / "crafted.pth")
    assert evaluate(["-r", path]) == 2
    assert "nested more than" in error_line(capsys)
    config = tmp_path / "config.json"
    config.write_text("[" * 100_000 + "]" * 100_000)
    assert train.main(["-c", str(config)]) == 2
    assert "nested more than" in error_line(capsys)
    assert files_under(tmp_path) == ["config.json", "crafted.pth"]


def test_a_repeated_key_among_many_is_named(data_slice, tmp_path, capsys):
    config = make_config(data_slice, tmp_path / "saved")
    keys = ", ".join(f'"k{i}": {i}' for i in range(60_000))
    text = json.dumps(config)[:-1] + f', "extra": {{{keys}, "k59999": 0}}}}'
    assert train.main(["-c", str(write_config_text(text, tmp_path / "config.json"))]) == 2
    assert "'k59999' appears twice" in error_line(capsys)


def write_config_text(text, path):
    path.write_text(text)
    return path


def test_a_builder_that_ends_the_program_is_one_line(data_slice, tmp_path, capsys, monkeypatch):
    """A package's command-line `main` named as `arch` calls sys.exit(0): the run did not train, so not exit 0."""
    package = tmp_path / "cli"
    package.mkdir()
    (package / "__init__.py").write_text("import sys\n\n\ndef main(num_classes):\n    sys.exit(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = make_config(data_slice, tmp_path / "saved")
    config["import_roots"] = ["cli"]
    config["arch"] = {"type": "cli.main", "args": {"num_classes": 10}}
    assert train.main(["-c", str(write_config(config, tmp_path / "config.json"))]) == 2
    assert error_line(capsys).startswith("error: arch: cli.main tried to end the program")
    assert not (tmp_path / "saved").exists()


NESTED_VALUES = st.recursive(PLAIN_VALUES.filter(lambda v: v is not REMOVED),
                             lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                             max_leaves=12)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), name=st.text(min_size=1, max_size=12), value=NESTED_VALUES, depth=st.integers(0, 150),
       shape=st.lists(st.integers(0, 4), max_size=3), dtype=st.sampled_from([torch.float32, torch.int64, torch.bool]))
def test_any_checkpoint_drawn_loads_or_is_one_line(saved_states, data, name, value, depth, shape, dtype):
    """A checkpoint with a key added anywhere (any name, nesting and value) or a weight of another shape and type:
    test.py predicts with it, or refuses it in one line, writing nothing."""
    where = data.draw(st.sampled_from(["top", "config", "config.trainer", "state_dict"]), label="where")

    def change(state):
        if where == "state_dict":
            key = data.draw(st.sampled_from(sorted(state["state_dict"])), label="weight")
            state["state_dict"][key] = torch.zeros(shape, dtype=dtype)
            return
        node = state if where == "top" else state["config"] if where == "config" else state["config"]["trainer"]
        for _ in range(depth):
            value_ = {name: None}
            node[name] = value_
            node = value_
        node[name] = value

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        path = crafted(saved_states, "end", change, folder / "crafted.pth")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = evaluate(["-r", path, "--out", folder / "out"])
        assert "Traceback" not in err.getvalue(), err.getvalue()
        if code == 2:
            assert len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
            assert files_under(folder) == ["crafted.pth"]
        else:
            assert code == 0 and (folder / "out" / "predictions.csv").exists(), err.getvalue()


def test_a_checkpoint_whose_data_loader_would_download_reaches_no_network(saved_states, tmp_path, capsys):
    """MnistDataLoader downloads what its data_dir lacks: from a checkpoint, test.py refuses the connection."""
    empty = tmp_path / "empty"
    empty.mkdir()
    loader = {"type": "MnistDataLoader", "args": {"data_dir": str(empty), "batch_size": 32, "num_workers": 0,
                                                     "validation_split": 0.1}}
    path = crafted(saved_states, "end", set_config("data_loader", loader), tmp_path / "crafted.pth")
    assert evaluate(["-r", path, "--out", tmp_path / "out"]) == 2
    assert "would reach the network" in error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_a_json_file_beside_the_data_that_is_no_regular_file_is_one_line(tmp_path, capsys):
    """A task.json (or a run group's group.json) linked to /dev/zero would be read without end: refused."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "probabilities.csv").write_text("id,0,1\nx,0.5,0.5\n")
    (tmp_path / "a" / "task.json").symlink_to("/dev/zero")
    code = evaluate(["--blend", tmp_path / "a" / "probabilities.csv", tmp_path / "b" / "probabilities.csv", "--out",
                     tmp_path / "out"])
    assert code == 2 and "not a regular file" in error_line(capsys)
    assert not (tmp_path / "out").exists()
