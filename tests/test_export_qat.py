"""Quantisation-aware distillation (robkit.export.qat): on held-out images a MobileNetV3 after QAT is
at least as close to its fp32 self as after post-training int8 with the same quantiser, and the
TFLite file written from the QAT graph computes what that graph computes (run in LiteRT)."""

from __future__ import annotations

import pytest
import torch
from export_helpers import cos, make_student, trained_student

from robkit.export.images import load_images
from robkit.export.targets import get_target
from robkit.export.wrappers import build_export_module, make_inputs

pytest.importorskip("litert_torch")


@pytest.fixture(scope="module")
def trained():
    return trained_student()


@pytest.fixture(scope="module")
def setup():
    """The case where post-training int8 loses most: an untrained MobileNetV3-Small (BatchNorm re-estimated),
    PTQ held-out cosine ~0.86 against ~0.87 after QAT (a trained one is at ~0.997 either way, where the
    order of the two is within run-to-run noise)."""
    target = get_target("android-tflite-int8")
    student = make_student("mobilenet_v3_small", images=128)
    mean, std = [0.286] * 3, [0.353] * 3
    module = build_export_module(student, target, mean, std, resolution=32)
    train_u8, _ = load_images("fashion-mnist", "train", 1024, 32, offset=0)
    held_u8, _ = load_images("fashion-mnist", "train", 64, 32, offset=20000)
    return target, module, make_inputs(train_u8, target, mean, std), make_inputs(held_u8, target, mean, std)


def test_qat_is_at_least_as_close_to_fp32_as_ptq_on_held_out_images(setup, tmp_path):
    from robkit.export import tflite_format as T
    from robkit.export.qat import QATSettings, qat_distill

    target, module, train_x, held_x = setup
    example = held_x[:1]
    with torch.no_grad():
        ref = module(held_x)
    ptq, ptq_quantizer = T.pt2e_quantize(module, example, train_x[:64], None)
    c_ptq = cos(T.run_torch_batch1(ptq, held_x), ref)
    qat, quantizer, result = qat_distill(
        module,
        example,
        train_x,
        held_x,
        settings=QATSettings(steps=60, batch_size=16, lr=1e-4),
        progress=False,
    )
    c_qat = cos(T.run_torch_batch1(qat, held_x), ref)
    assert result.cosine_after == pytest.approx(c_qat, abs=2e-3)
    assert result.losses[-1] < result.losses[0]
    assert c_qat >= c_ptq, (c_qat, c_ptq)
    assert c_qat > result.cosine_before - 1e-3  # training did not undo the calibrated start

    # the files, run in LiteRT: the QAT file is closer to fp32 than the PTQ file
    def in_litert(gm, q, name):
        path = tmp_path / name
        T.convert_static_int8(gm, q, example, path)
        runner = T.TFLiteRunner(path)
        got = torch.cat([torch.as_tensor(runner(held_x[i : i + 1].numpy())) for i in range(16)])
        return path, got

    ptq_path, ptq_got = in_litert(ptq, ptq_quantizer, "ptq.tflite")
    qat_path, qat_got = in_litert(qat, quantizer, "qat.tflite")
    assert cos(qat_got, ref[:16]) >= cos(ptq_got, ref[:16])
    types = T.weight_types(qat_path)
    assert types.get("int8", 0) > 0 and types.get("float32", 0) == 0, types


def test_a_qat_graph_worse_than_post_training_int8_is_not_the_file(setup):
    """When QAT ends below PTQ (here: a learning rate that wrecks the weights), the post-training graph is
    planned too and becomes the file; the record keeps both plans and says which graph won."""
    from robkit.export import tflite_format as T
    from robkit.export.int8 import chosen_cosine, pt2e_static_int8
    from robkit.export.qat import QATRun, QATSettings, litert_qat_quantizer

    target, module, train_x, held_x = setup
    search_x, cal_x = held_x[:32], train_x[:64]
    with torch.no_grad():
        ref = module(search_x)
    wrecked = QATRun(QATSettings(steps=12, batch_size=16, lr=0.5), train_x[64:256])
    plan, gm, _ = pt2e_static_int8(
        module, target, held_x[:1], cal_x, search_x, False, qat=wrecked.for_quantizer(litert_qat_quantizer)
    )
    rec = plan.qat
    assert rec["graph"] == "ptq", rec
    assert (rec["ptq_plan"]["met"], -rec["ptq_plan"]["float_layers"], rec["ptq_plan"]["cosine"]) > (
        rec["qat_plan"]["met"],
        -rec["qat_plan"]["float_layers"],
        rec["qat_plan"]["cosine"],
    )
    assert rec["cosine_after"] < rec["cosine_before"]  # QAT did make it worse
    # the returned graph is the post-training candidate the plan scored
    assert cos(T.run_torch_batch1(gm, search_x), ref) == pytest.approx(chosen_cosine(plan), abs=1e-4)
    assert chosen_cosine(plan) == pytest.approx(rec["ptq_plan"]["cosine"])


def test_bad_settings_are_refused():
    from robkit.export.qat import QATSettings

    with pytest.raises(ValueError, match=r"lr > 0.*lr=0.0"):
        QATSettings(steps=1, lr=0.0)
    with pytest.raises(ValueError, match="checkpoint_every must be >= 1, got 0"):
        QATSettings(checkpoint_every=0)


def _run(setup, state, stop_at=None, **kw):
    from robkit.export.qat import QATSettings, qat_distill

    _, module, train_x, held_x = setup

    def stop(step):
        if step == stop_at:
            raise KeyboardInterrupt  # what a killed run leaves behind: the last checkpointed state

    settings = QATSettings(**{"steps": 6, "batch_size": 8, "lr": 1e-4, "checkpoint_every": 2, **kw})
    return qat_distill(
        module,
        held_x[:1],
        train_x[:128],
        held_x[:16],
        settings=settings,
        progress=False,
        state=state,
        on_step=stop,
    )


def test_killed_qat_resumes_exactly_and_refuses_other_settings(setup, tmp_path):
    from robkit.utils.errors import ResumeMismatch

    _, _, _, held_x = setup
    whole, _, r_whole = _run(setup, None)
    state = tmp_path / "qat-state.pt"
    with pytest.raises(KeyboardInterrupt):
        _run(setup, state, stop_at=3)  # steps 0-3 ran, the state holds step 4 (checkpoint every 2)
    stored = torch.load(state, weights_only=True)
    assert stored["step"] == 4 and len(stored["losses"]) == 4

    with pytest.raises(ResumeMismatch, match=r"lr: 0.0001 -> 0.0002"):
        _run(setup, state, lr=2e-4)
    resumed, _, r_resumed = _run(setup, state)
    assert r_resumed.losses == r_whole.losses  # the same batches, the same optimiser state
    assert r_resumed.cosine_before == r_whole.cosine_before
    with torch.no_grad():
        assert torch.equal(resumed(held_x[:8]), whole(held_x[:8]))


def _checkpoint(tmp_path, student=None):
    from export_helpers import save_student_checkpoint

    student = student if student is not None else make_student("mobilenet_v3_small", images=128)
    return save_student_checkpoint(student, tmp_path / "ckpt.pt")


def test_export_qat_from_the_cli_writes_an_all_int8_file_and_records_qat(trained, tmp_path):
    """``robkit export --qat``: the file is converted from the QAT graph, its card says what QAT did, the
    resumable state is gone once the file is written, and the file in LiteRT matches the fp32 student."""
    from click.testing import CliRunner

    from robkit.cli import main
    from robkit.export import tflite_format as T
    from robkit.export.card import read_card

    ckpt = _checkpoint(tmp_path, trained)
    out = tmp_path / "qat.tflite"
    args = ["export", str(ckpt), "--target", "android-tflite-int8", "--out", str(out), "--qat"]
    args += ["--qat-steps", "8", "--qat-images", "96", "--qat-lr", "1e-4", "--qat-batch-size", "16"]
    r = CliRunner().invoke(main, args + ["--calibration-images", "16", "--parity-images", "16"])
    assert r.exit_code == 0, r.output
    assert "qat      8 steps" in r.output
    card = read_card(out)
    qat = card["quantization"]["qat"]
    assert qat["steps"] == 8 and qat["images"] == 96 and qat["lr"] == 1e-4
    assert 0 < qat["cosine_before"] <= 1 and 0 < qat["cosine_after"] <= 1
    assert "quantisation-aware" in card["conversion"]["quantizer"]
    assert not (tmp_path / "qat.tflite.qat-state.pt").exists()
    if not card["quantization"]["float_layers"]:  # QAT met the threshold: no float search, no PTQ graph
        assert len(card["quantization"]["search"]) == 1
        assert qat["graph"] == "qat" and "ptq_plan" not in qat
    assert card["parity"]["cosine"] >= 0.98
    assert card["parity"]["vs_simulated"]["cosine"] > 0.99  # the file computes what the QAT graph computes
    assert T.weight_types(out).get("int8", 0) > 0


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18", "vit_tiny"])
def test_export_qat_runs_from_the_cli_for_every_student_family(arch, tmp_path):
    """``--qat`` is not a MobileNetV3 special case: a depthwise CNN, a residual CNN and a transformer each
    get a QAT-trained int8 file from the CLI, with what QAT did on the card and the file's parity met
    (QAT or, where it loses, the post-training plan: the card says which graph the file holds)."""
    from click.testing import CliRunner
    from export_helpers import save_student_checkpoint

    from robkit.cli import main
    from robkit.export import tflite_format as T
    from robkit.export.card import read_card

    student = make_student(arch, images=64)
    ckpt = save_student_checkpoint(student, tmp_path / "ckpt.pt", arch=arch)
    out = tmp_path / f"{arch}.tflite"
    args = ["export", str(ckpt), "--target", "android-tflite-int8", "--out", str(out), "--qat"]
    args += ["--qat-steps", "3", "--qat-images", "48", "--qat-batch-size", "8"]
    r = CliRunner().invoke(main, args + ["--calibration-images", "16", "--parity-images", "16"])
    assert r.exit_code == 0, r.output
    assert "qat      3 steps" in r.output
    card = read_card(out)
    qat = card["quantization"]["qat"]
    assert qat["steps"] == 3 and qat["images"] == 48
    assert qat["graph"] in ("qat", "ptq") and qat["loss_first"] is not None and qat["loss_last"] is not None
    assert 0 < qat["cosine_before"] <= 1 and 0 < qat["cosine_after"] <= 1
    assert card["status"] == "passed" and card["parity"]["cosine"] >= 0.98
    assert T.weight_types(out).get("int8", 0) > 0


def test_qat_is_refused_for_targets_it_does_not_train_for(tmp_path):
    from click.testing import CliRunner

    from robkit.cli import main

    ckpt = _checkpoint(tmp_path)
    r = CliRunner().invoke(main, ["export", str(ckpt), "--target", "onnx-int8-cpu", "--qat"])
    assert r.exit_code != 0
    assert "onnx-int8-cpu" in r.output and "android-tflite-int8" in r.output
    assert "Traceback" not in r.output


def _activation_scales(gm) -> list[float]:
    """The per-tensor activation scales of a converted (int8-simulated) graph, in graph order."""
    return [
        float(n.args[1])
        for n in gm.graph.nodes
        if n.op == "call_function"
        and "quantize_per_tensor" in str(n.target)
        and "dequantize" not in str(n.target)
    ]


def test_activation_ranges_are_learned_from_the_calibrated_start_or_kept_fixed(setup):
    """``range_lr > 0``: the activation scales of the converted graph move away from the calibrated ones
    and stay at or above the runtimes' smallest scale; ``range_lr = 0``: they are exactly the calibrated
    ones."""
    from robkit.export.qat import EPS, QATSettings, qat_distill

    _, module, train_x, held_x = setup

    def scales(steps: int, range_lr: float) -> list[float]:
        settings = QATSettings(steps=steps, batch_size=16, lr=1e-4, range_lr=range_lr)
        gm, _, _ = qat_distill(module, held_x[:1], train_x, settings=settings, progress=False)
        return _activation_scales(gm)

    start = scales(0, 0.0)
    assert len(start) > 50  # every activation of a MobileNetV3-Small is int8
    assert scales(8, 0.0) == start
    learned = scales(8, 1e-3)
    assert len(learned) == len(start)
    moved = sum(abs(a - b) > 1e-6 * b for a, b in zip(learned, start))
    assert moved > len(start) // 2, (moved, len(start))
    assert min(learned) >= EPS


def test_calibration_puts_small_images_in_one_observer_call():
    from robkit.export.qat import calibrate

    calls = []
    model = torch.nn.Identity()
    model.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    calibrate(model, torch.zeros(1024, 3, 32, 32))
    assert calls == [1024, 1024]  # the range pass, then the observing pass
    calls.clear()
    calibrate(model, torch.zeros(64, 3, 224, 224))
    assert calls == [20, 20, 20, 4] * 2  # 1024 * 32 * 32 pixels per call, in each pass
    with pytest.raises(ValueError, match=r"range_lr must be >= 0.*got -0.1"):
        from robkit.export.qat import QATSettings

        QATSettings(range_lr=-0.1)
