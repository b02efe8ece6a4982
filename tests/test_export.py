"""ONNX export and the PyTorch bridge (fastgrad.export), checked by running
the exported model in ONNX Runtime and the module in PyTorch and comparing
with ``predict``: ONNX Runtime within 1e-5 (float32) and 1e-10 (float64),
PyTorch within 1e-5 and 1e-12, relative to each row's largest output (an
element near zero is held to the row's scale), for every registered layer
and activation, one row and many rows. The cases come from the registries,
so that a new layer or activation without an exporter fails here."""
import numpy as np
import pytest
from scipy import special

import fastgrad as fg
from fastgrad import activations, export
import _layer_cases
from _layer_cases import LAYER_KINDS, layer_model

ACTIVATIONS = sorted(activations.REGISTRY.names)   # aliases too: swish, hard_swish
RTOL = {"float32": 1e-5, "float64": 1e-10}
TORCH_RTOL = {"float32": 1e-5, "float64": 1e-12}


def close(got, want, dtype, rtol=RTOL):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.isfinite(want).all(), "the case should have finite outputs"
    scale = np.abs(want).max(axis=1, keepdims=True)
    err = np.abs(got.astype(np.float64) - want)
    bad = err > rtol[dtype] * np.maximum(np.abs(want), scale)
    assert not bad.any(), (f"max error {err.max()}, at {np.argwhere(bad)[0]}: "
                           f"{got[tuple(np.argwhere(bad)[0])]} vs {want[tuple(np.argwhere(bad)[0])]}")


def model_with(act, dtype, seed=0):
    """Every layer kind around one activation, trained a little so that
    BatchNormalization's moving statistics are not their initial values."""
    # exp only once, in the Activation layer: stacked, it overflows or
    # amplifies float32 rounding of the sums in between past the tolerance
    dense_act = "tanh" if act == "exponential" else act
    m = fg.Sequential([fg.layers.Dense(9, activation=dense_act, input_dim=6),
                       fg.layers.BatchNormalization(epsilon=0.05, momentum=0.5),
                       fg.layers.Dropout(0.3),
                       fg.layers.Dense(7, use_bias=False),
                       fg.layers.BatchNormalization(center=False, epsilon=1e-4),
                       fg.layers.Activation(act),
                       fg.layers.Dense(4, activation=dense_act)],
                      dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed)
    m.compile(fg.optimizers.Adam(1e-2), "mse")
    x = rng.standard_normal((64, 6)) * 2
    m.fit(x, rng.standard_normal((64, 4)), epochs=2, batch_size=16, verbose=0)
    return m, rng.standard_normal((33, 6)) * 4   # every branch: see the test


def _ort():
    return pytest.importorskip("onnxruntime", reason="needs ONNX Runtime, the cross-check "
                               "peer: pip install onnxruntime")


@pytest.fixture(scope="module")
def onnx():
    return pytest.importorskip("onnx", reason="needs the onnx extra: pip install '.[onnx]'")


def _torch():
    return pytest.importorskip("torch", reason="needs the torch extra: pip install '.[torch]'")


def onnx_outputs(model, batches, tmp_path):
    pytest.importorskip("onnx", reason="needs the onnx extra: pip install '.[onnx]'")
    ort = _ort()
    path = tmp_path / "m.onnx"
    model.export(path, format="onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [sess.run(None, {"input": b})[0] for b in batches]


def torch_outputs(model, batches, tmp_path):
    torch = _torch()
    module = export.to_torch(model)
    assert not module.training
    with torch.no_grad():
        return [module(torch.from_numpy(b)).numpy() for b in batches]


ENGINES = {"onnxruntime": (onnx_outputs, RTOL), "torch": (torch_outputs, TORCH_RTOL)}


def agree(engine, model, x, dtype, tmp_path):
    """The engine's outputs equal predict's, for one row and for many (one
    dynamic batch dimension)."""
    run, rtol = ENGINES[engine]
    batches = [x[:1].astype(dtype), x.astype(dtype)]
    for got, rows in zip(run(model, batches, tmp_path), batches):
        close(got, model.predict(rows, verbose=0), dtype, rtol)


def dense_out(layer, x):
    """A Dense layer's pre-activation output, in float64."""
    w = layer.get_weights()
    return x @ w[0] + (w[1] if len(w) > 1 else 0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("engine", ENGINES)
def test_every_activation_computes_what_predict_computes(tmp_path, engine, act, dtype):
    m, x = model_with(act, dtype)
    z = dense_out(m.layers[0], x)
    # every branch: relu6's cap at 6, hard_sigmoid's ends at -3 and 3
    assert z.min() < -3 and z.max() > 6
    agree(engine, m, x, dtype, tmp_path)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("engine", ENGINES)
def test_every_activation_holds_element_by_element_from_minus_40_to_40(tmp_path, engine,
                                                                       act, dtype):
    # both tails (softplus, mish and silu of -40 are about 1e-17 in size)
    # and the kinks, each element to the tolerance relative to itself
    m = fg.Sequential([fg.layers.Activation(act, input_dim=3)], dtype=dtype)
    m.build()
    x = np.linspace(-40, 40, 1602).reshape(-1, 3).astype(dtype)
    run, rtol = ENGINES[engine]
    (got,) = run(m, [x], tmp_path)
    # float32 gelu is x (1 + erf) / 2 in ONNX: 1e-7 absolute where 1 + erf
    # cancels; results near underflow (subnormal steps on the way) in absolute
    atol = 2e-7 if (dtype, engine, act) == ("float32", "onnxruntime", "gelu") else \
        np.finfo(dtype).tiny * 1e3
    np.testing.assert_allclose(got, m.predict(x, verbose=0), rtol=rtol[dtype], atol=atol)


def test_every_registered_layer_has_a_case():
    assert sorted(_layer_cases.LAYER_CASES) == LAYER_KINDS


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("engine", ENGINES)
def test_every_layer_computes_what_predict_computes(tmp_path, engine, kind, dtype):
    m, x = layer_model(kind, dtype)
    if kind == "ReLU":   # below the threshold, between it and the cap, above the cap
        z = dense_out(m.layers[0], x)
        assert (z <= 0.5).any() and ((z > 0.5) & (z < 1.5)).any() and (z >= 1.5).any()
    if kind == "PReLU":
        assert (m.layers[1].get_weights()[0] != 0).all()
        assert (dense_out(m.layers[0], x) < 0).any()
    agree(engine, m, x, dtype, tmp_path)


def test_gelu_is_exact_far_into_both_tails(tmp_path, onnx):
    ort = _ort()
    x = np.linspace(-30, 12, 4001).reshape(-1, 1)
    for dtype, rtol in (("float32", None), ("float64", 1e-11)):
        m = fg.Sequential([fg.layers.Activation("gelu", input_dim=1)], dtype=dtype)
        m.build()
        m.export(tmp_path / f"g{dtype}.onnx")
        sess = ort.InferenceSession(str(tmp_path / f"g{dtype}.onnx"),
                                    providers=["CPUExecutionProvider"])
        xs = x.astype(dtype)
        got, want = sess.run(None, {"input": xs})[0], m.predict(xs)
        # reference: x Phi(x) from SciPy's erfc in float64
        exact = x * 0.5 * special.erfc(-x / np.sqrt(2))
        if rtol is None:   # float32: 1 + erf, good to 1e-7 absolute where it cancels
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-7)
        else:              # float64: relative everywhere, the far left tail included
            np.testing.assert_allclose(got, exact, rtol=rtol, atol=0)
            np.testing.assert_allclose(got, want, rtol=rtol, atol=0)


def test_the_graph_has_a_dynamic_batch_its_dtype_and_no_dropout(onnx):
    for dtype, elem in (("float32", onnx.TensorProto.FLOAT),
                        ("float64", onnx.TensorProto.DOUBLE)):
        m, _ = model_with("relu", dtype)
        proto = export.to_onnx(m)
        onnx.checker.check_model(proto, full_check=True)
        (inp,), (out,) = proto.graph.input, proto.graph.output
        assert inp.type.tensor_type.elem_type == elem == out.type.tensor_type.elem_type
        dims = inp.type.tensor_type.shape.dim
        assert dims[0].dim_param and not dims[0].HasField("dim_value")
        assert dims[1].dim_value == 6
        ops = [n.op_type for n in proto.graph.node]
        assert "Dropout" not in ops
        assert proto.opset_import[0].version == export.OPSET
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
        assert all(a.dtype == np.dtype(dtype) for a in inits.values())
        if dtype == "float32":   # the op, with each layer's own epsilon
            eps = [a.f for n in proto.graph.node if n.op_type == "BatchNormalization"
                   for a in n.attribute if a.name == "epsilon"]
            np.testing.assert_allclose(eps, [0.05, 1e-4], rtol=1e-7)
        else:                    # plain operators, epsilon in double
            eps = sorted(float(v) for k, v in inits.items() if "_eps" in k)
            assert eps == [1e-4, 0.05]


def test_export_refuses_other_formats_and_unbuilt_models(tmp_path, onnx):
    m = fg.Sequential([fg.layers.Dense(2)])
    with pytest.raises(ValueError, match="build"):
        m.export(tmp_path / "m.onnx")
    m.build(3)
    with pytest.raises(ValueError, match="format"):
        m.export(tmp_path / "m.onnx", format="tf_saved_model")
    assert not (tmp_path / "m.onnx").exists()


def test_the_torch_module_holds_copies_and_can_train():
    torch = _torch()
    m, x = model_with("gelu", "float32", seed=4)
    module = export.to_torch(m)
    kinds = [type(c).__name__ for c in module]
    assert kinds == ["Linear", "GELU", "BatchNorm1d", "Dropout", "Linear", "BatchNorm1d",
                     "GELU", "Linear", "GELU"]
    assert module[5].bias.requires_grad is False   # center=False: the shift stays 0
    assert module[2].momentum == pytest.approx(0.5)
    np.testing.assert_array_equal(module[0].weight.detach().numpy(), m.get_weights()[0].T)
    before = m.get_weights()
    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    loss = module(torch.from_numpy(x.astype(np.float32))).pow(2).mean()
    loss.backward()
    opt.step()
    for a, b in zip(before, m.get_weights()):   # the fastgrad model is untouched
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(module[0].weight.detach().numpy(), before[0].T)


class Custom(fg.layers.Identity):
    """A layer of the user's own, which no exporter knows."""


@pytest.mark.parametrize("engine", ["onnx", "torch"])
def test_a_layer_without_an_exporter_is_refused_by_name(engine):
    m = fg.Sequential([fg.layers.Dense(3, input_dim=4), Custom(name="mine")])
    m.build()
    if engine == "onnx":
        pytest.importorskip("onnx", reason="needs the onnx extra: pip install '.[onnx]'")
        convert = export.to_onnx
    else:
        _torch()
        convert = export.to_torch
    with pytest.raises(ValueError, match="mine.*Custom"):
        convert(m)
