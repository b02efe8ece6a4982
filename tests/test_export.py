"""ONNX export and the PyTorch bridge (fastgrad.export), checked by running
the exported model in ONNX Runtime and the module in PyTorch and comparing
with ``predict``: float32 within 1e-5 and float64 within 1e-10, relative to
each row's largest output (an element near zero is held to the row's scale),
for every layer and activation, one row and many rows."""
import numpy as np
import pytest
from scipy import special

import fastgrad as fg
from fastgrad import export

ACTIVATIONS = ["linear", "relu", "leaky_relu", "elu", "selu", "gelu", "silu", "sigmoid",
               "tanh", "softmax"]
RTOL = {"float32": 1e-5, "float64": 1e-10}


def close(got, want, dtype):
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = np.abs(want).max(axis=1, keepdims=True)
    err = np.abs(got.astype(np.float64) - want)
    bad = err > RTOL[dtype] * np.maximum(np.abs(want), scale)
    assert not bad.any(), (f"max error {err.max()}, at {np.argwhere(bad)[0]}: "
                           f"{got[tuple(np.argwhere(bad)[0])]} vs {want[tuple(np.argwhere(bad)[0])]}")


def model_with(act, dtype, seed=0):
    """Every layer kind around one activation, trained a little so that
    BatchNormalization's moving statistics are not their initial values."""
    m = fg.Sequential([fg.layers.Dense(9, activation=act, input_dim=6),
                       fg.layers.BatchNormalization(epsilon=0.05, momentum=0.5),
                       fg.layers.Dropout(0.3),
                       fg.layers.Dense(7, use_bias=False),
                       fg.layers.BatchNormalization(center=False, epsilon=1e-4),
                       fg.layers.Activation(act),
                       fg.layers.Dense(4, activation=act)], dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed)
    m.compile(fg.optimizers.Adam(1e-2), "mse")
    x = rng.standard_normal((64, 6)) * 2
    m.fit(x, rng.standard_normal((64, 4)), epochs=2, batch_size=16, verbose=0)
    return m, rng.standard_normal((33, 6)) * 3


def _ort():
    return pytest.importorskip("onnxruntime", reason="needs ONNX Runtime, the cross-check "
                               "peer: pip install onnxruntime")


@pytest.fixture(scope="module")
def onnx():
    return pytest.importorskip("onnx", reason="needs the onnx extra: pip install '.[onnx]'")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_onnx_runtime_equals_predict(tmp_path, onnx, act, dtype):
    ort = _ort()
    m, x = model_with(act, dtype)
    path = tmp_path / "m.onnx"
    m.export(path, format="onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = x.astype(dtype)
    for rows in (x[:1], x):   # one row and many, through one dynamic batch dimension
        got = sess.run(None, {"input": rows})[0]
        close(got, m.predict(rows), dtype)


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


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_torch_module_equals_predict(dtype):
    torch = pytest.importorskip("torch", reason="needs the torch extra: "
                                "pip install '.[torch]'")
    for act in ACTIVATIONS:
        m, x = model_with(act, dtype, seed=3)
        module = export.to_torch(m)
        assert not module.training
        x = x.astype(dtype)
        with torch.no_grad():
            got = module(torch.from_numpy(x)).numpy()
        close(got, m.predict(x), dtype)
        close(module(torch.from_numpy(x[:1])).detach().numpy(), m.predict(x[:1]), dtype)


def test_the_torch_module_holds_copies_and_can_train():
    torch = pytest.importorskip("torch", reason="needs the torch extra: "
                                "pip install '.[torch]'")
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


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_torch_module_of_the_newer_layers_and_activations_equals_predict(dtype):
    torch = pytest.importorskip("torch", reason="needs the torch extra: "
                                "pip install '.[torch]'")
    L = fg.layers
    rng = np.random.default_rng(5)
    for act in ("softplus", "softsign", "relu6", "hard_sigmoid", "hard_silu", "mish",
                "log_softmax"):
        m = fg.Sequential([L.Dense(9, activation=act, input_dim=6),
                           L.LayerNormalization(epsilon=0.05), L.GaussianNoise(0.1),
                           L.Dense(7), L.LeakyReLU(0.1), L.Identity(), L.Dense(5), L.ELU(0.5),
                           L.LayerNormalization(center=False), L.Dense(4, activation=act)],
                          dtype=dtype, seed=5)
        m.compile(fg.optimizers.Adam(1e-2), "mse")
        m.fit(rng.standard_normal((64, 6)), rng.standard_normal((64, 4)), epochs=1,
              batch_size=16, verbose=0)
        x = (rng.standard_normal((33, 6)) * 3).astype(dtype)
        with torch.no_grad():
            got = export.to_torch(m)(torch.from_numpy(x)).numpy()
        want = m.predict(x)
        if dtype == "float64":
            close(got, want, dtype)
        else:   # two normalizations in ten float32 layers: 1e-4 of the outputs' scale
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_layers_without_a_torch_form_are_refused_by_name():
    pytest.importorskip("torch", reason="needs the torch extra: pip install '.[torch]'")
    for layer in (fg.layers.PReLU(), fg.layers.ReLU(max_value=6.0), fg.layers.Rescaling(0.5)):
        m = fg.Sequential([fg.layers.Dense(3, input_dim=4), layer])
        m.build()
        with pytest.raises(ValueError, match=layer.kind):
            export.to_torch(m)
    m = fg.Sequential([fg.layers.Dense(3, activation="exponential", input_dim=4)])
    m.build()
    with pytest.raises(ValueError, match="exponential"):
        export.to_torch(m)
