"""Importing StyleGAN2 checkpoints: both real formats, parity, refusals.

The tests write randomly initialised reference generators in the formats users have
(rosinality `.pt` with the `g_ema` key layout, NVIDIA `.pkl` with persistent-class records as
stylegan2-ada-pytorch pickles them) and compute each reference's forward pass with an
independent implementation here: the fused (grouped, per-sample weight) modulated conv of the
original code and each format's own gain conventions, read straight from the file's keys. The
imported model (non-fused convs, our key names) must reproduce it to 1e-4.
"""

from __future__ import annotations

import math
import pickle
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from latentedit.errors import InvalidArgument
from latentedit.models.checkpoints import CheckpointError, convert, import_checkpoint
from latentedit.models.registry import load_generator

RES, DIM, MLP = 32, 16, 3
CHANNELS = [12, 10, 8, 6]  # blocks 4, 8, 16, 32
SQRT2 = math.sqrt(2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _kernel() -> torch.Tensor:
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    k = torch.outer(k, k)
    return k / k.sum()


# ---- an independent reference forward (fused grouped convolutions) -----------------------------


def ref_modconv(x, weight, styles, demodulate, up):
    n, cin, h, w = x.shape
    cout, _, k, _ = weight.shape
    wt = weight[None] * styles[:, None, :, None, None]  # [N, O, I, k, k]
    if demodulate:
        wt = wt * torch.rsqrt(wt.square().sum(dim=(2, 3, 4)) + 1e-8)[:, :, None, None, None]
    x = x.reshape(1, n * cin, h, w)
    if up:
        wt = wt.transpose(1, 2).reshape(n * cin, cout, k, k)
        out = F.conv_transpose2d(x, wt, stride=2, groups=n)
        blur = (_kernel() * 4)[None, None].repeat(n * cout, 1, 1, 1)
        out = F.conv2d(out, blur, padding=1, groups=n * cout)
    else:
        out = F.conv2d(x, wt.reshape(n * cout, cin, k, k), padding=k // 2, groups=n)
    return out.reshape(n, cout, *out.shape[2:])


def ref_upsample(img):
    c = img.shape[1]
    k = (_kernel() * 4)[None, None].repeat(c, 1, 1, 1)
    return F.conv_transpose2d(img, k, stride=2, padding=1, groups=c)


def ref_mapping(z, layers, lr_mul=0.01):
    x = z * torch.rsqrt(z.square().mean(1, keepdim=True) + 1e-8)
    for weight, bias in layers:
        x = F.leaky_relu(x @ (weight * lr_mul / math.sqrt(weight.shape[1])).t() + bias * lr_mul, 0.2) * SQRT2
    return x


def rosinality_forward(sd, ws):
    """rosinality/stylegan2-pytorch Generator.forward, from its state-dict keys."""
    style_dim = ws.shape[2]

    def styled(name, x, w, noise, up=False):
        weight = sd[f"{name}.conv.weight"][0]
        scale = 1 / math.sqrt(weight.shape[1] * weight.shape[2] ** 2)
        styles = w @ (sd[f"{name}.conv.modulation.weight"] / math.sqrt(style_dim)).t() + sd[f"{name}.conv.modulation.bias"]
        x = ref_modconv(x, scale * weight, styles, True, up)
        x = x + sd[f"{name}.noise.weight"] * noise
        return F.leaky_relu(x + sd[f"{name}.activate.bias"][None, :, None, None], 0.2) * SQRT2

    def to_rgb(name, x, w, skip):
        weight = sd[f"{name}.conv.weight"][0]
        scale = 1 / math.sqrt(weight.shape[1])
        styles = w @ (sd[f"{name}.conv.modulation.weight"] / math.sqrt(style_dim)).t() + sd[f"{name}.conv.modulation.bias"]
        out = ref_modconv(x, scale * weight, styles, False, False) + sd[f"{name}.bias"]
        return out if skip is None else out + ref_upsample(skip)

    x = sd["input.input"].repeat(len(ws), 1, 1, 1)
    x = styled("conv1", x, ws[:, 0], sd["noises.noise_0"])
    skip = to_rgb("to_rgb1", x, ws[:, 1], None)
    i = 1
    for block in range(len(CHANNELS) - 1):
        x = styled(f"convs.{2 * block}", x, ws[:, i], sd[f"noises.noise_{2 * block + 1}"], up=True)
        x = styled(f"convs.{2 * block + 1}", x, ws[:, i + 1], sd[f"noises.noise_{2 * block + 2}"])
        skip = to_rgb(f"to_rgbs.{block}", x, ws[:, i + 2], skip)
        i += 2
    return skip


def nvidia_forward(sd, ws, clamp=None):
    """stylegan2-ada-pytorch SynthesisNetwork.forward (fused modconv, noise_mode='const')."""
    w_dim = ws.shape[2]

    def act(x, bias, gain):
        x = F.leaky_relu(x + bias[None, :, None, None], 0.2) * gain if gain != 1 else x + bias[None, :, None, None]
        return x.clamp(-clamp, clamp) if clamp is not None else x

    def layer(name, x, w, up=False):
        styles = w @ (sd[f"{name}.affine.weight"] / math.sqrt(w_dim)).t() + sd[f"{name}.affine.bias"]
        x = ref_modconv(x, sd[f"{name}.weight"], styles, True, up)  # no weight gain: demodulation undoes it
        x = x + sd[f"{name}.noise_const"] * sd[f"{name}.noise_strength"]
        return act(x, sd[f"{name}.bias"], SQRT2)

    def torgb(name, x, w):
        weight = sd[f"{name}.weight"]
        styles = (w @ (sd[f"{name}.affine.weight"] / math.sqrt(w_dim)).t() + sd[f"{name}.affine.bias"]) / math.sqrt(
            weight.shape[1])
        return act(ref_modconv(x, weight, styles, False, False), sd[f"{name}.bias"], 1)

    x = sd["synthesis.b4.const"][None].repeat(len(ws), 1, 1, 1)
    x = layer("synthesis.b4.conv1", x, ws[:, 0])
    img = torgb("synthesis.b4.torgb", x, ws[:, 1])
    w_idx = 1
    for res in (8, 16, 32):
        x = layer(f"synthesis.b{res}.conv0", x, ws[:, w_idx], up=True)
        x = layer(f"synthesis.b{res}.conv1", x, ws[:, w_idx + 1])
        img = ref_upsample(img) + torgb(f"synthesis.b{res}.torgb", x, ws[:, w_idx + 2])
        w_idx += 2
    return img


# ---- writers of the two formats ----------------------------------------------------------------


def rosinality_state(seed: int) -> tuple[OrderedDict, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, offset=0.0):
        return torch.randn(*shape, generator=g) * scale + offset

    sd: OrderedDict = OrderedDict()
    for j in range(1, MLP + 1):
        sd[f"style.{j}.weight"] = rnd(DIM, DIM, scale=100.0)  # N(0, 1) / lr_mul
        sd[f"style.{j}.bias"] = rnd(DIM, scale=10.0)
    sd["input.input"] = rnd(1, CHANNELS[0], 4, 4)

    def styled(name, cin, cout, res, up):
        sd[f"{name}.conv.weight"] = rnd(1, cout, cin, 3, 3)
        sd[f"{name}.conv.modulation.weight"] = rnd(cin, DIM)
        sd[f"{name}.conv.modulation.bias"] = rnd(cin, scale=0.2, offset=1.0)
        if up:
            sd[f"{name}.conv.blur.kernel"] = _kernel() * 4
        sd[f"{name}.noise.weight"] = rnd(1, scale=0.3)
        sd[f"{name}.activate.bias"] = rnd(cout, scale=0.2)

    def to_rgb(name, cin, up):
        if up:
            sd[f"{name}.upsample.kernel"] = _kernel() * 4
        sd[f"{name}.conv.weight"] = rnd(1, 3, cin, 1, 1)
        sd[f"{name}.conv.modulation.weight"] = rnd(cin, DIM)
        sd[f"{name}.conv.modulation.bias"] = rnd(cin, scale=0.2, offset=1.0)
        sd[f"{name}.bias"] = rnd(1, 3, 1, 1, scale=0.2)

    styled("conv1", CHANNELS[0], CHANNELS[0], 4, False)
    to_rgb("to_rgb1", CHANNELS[0], False)
    for b in range(len(CHANNELS) - 1):
        styled(f"convs.{2 * b}", CHANNELS[b], CHANNELS[b + 1], 8 * 2**b, True)
        styled(f"convs.{2 * b + 1}", CHANNELS[b + 1], CHANNELS[b + 1], 8 * 2**b, False)
        to_rgb(f"to_rgbs.{b}", CHANNELS[b + 1], True)
    sd["noises.noise_0"] = rnd(1, 1, 4, 4)
    for k in range(1, 2 * len(CHANNELS) - 1):
        res = 2 ** ((k + 5) // 2)
        sd[f"noises.noise_{k}"] = rnd(1, 1, res, res)
    return sd, rnd(1, DIM)


class _Persistent:
    """Pickles like a stylegan2-ada-pytorch persistent module: _reconstruct_persistent_obj(meta)."""

    def __init__(self, class_name, params, buffers, modules, **attrs):
        self.class_name, self.params, self.buffers, self.modules, self.attrs = class_name, params, buffers, modules, attrs

    def __reduce__(self):
        easydict = sys.modules["dnnlib.util"].EasyDict
        state = {"training": False, "_parameters": OrderedDict(self.params), "_buffers": OrderedDict(self.buffers),
                 "_non_persistent_buffers_set": set(), "_modules": OrderedDict(self.modules),
                 "_init_args": (), "_init_kwargs": easydict(self.attrs), **self.attrs}
        meta = {"type": "class", "version": 6, "class_name": self.class_name, "state": state,
                # the reference loader exec()s this; ours must never run it
                "module_src": "import pathlib\npathlib.Path(MARKER).write_text('module_src ran')\n"}
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,))


def nvidia_state(seed: int, conv_clamp=None) -> tuple[dict, _Persistent]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, offset=0.0):
        return torch.nn.Parameter(torch.randn(shape, generator=g) * scale + offset, requires_grad=False)

    flat: dict[str, torch.Tensor] = {}

    def fc(name, cin, cout, lr, bias_offset=0.0, scale=1.0):
        w, b = rnd(cout, cin, scale=scale / lr), rnd(cout, scale=0.2 / lr, offset=bias_offset)
        flat[f"{name}.weight"], flat[f"{name}.bias"] = w, b
        return _Persistent("FullyConnectedLayer", {"weight": w, "bias": b}, {}, {}, activation="lrelu",
                           weight_gain=lr / math.sqrt(cin), bias_gain=lr)

    mapping_layers = {f"fc{i}": fc(f"mapping.fc{i}", DIM, DIM, 0.01) for i in range(MLP)}
    w_avg = torch.randn(DIM, generator=g)
    flat["mapping.w_avg"] = w_avg
    mapping = _Persistent("MappingNetwork", {}, {"w_avg": w_avg}, mapping_layers, z_dim=DIM, w_dim=DIM, num_layers=MLP)

    def layer(name, cin, cout, res, up, torgb=False):
        affine = fc(f"{name}.affine", DIM, cin, 1, bias_offset=1.0)
        params = {"weight": rnd(cout, cin, 1 if torgb else 3, 1 if torgb else 3), "bias": rnd(cout, scale=0.2)}
        buffers = {}
        if not torgb:
            params["noise_strength"] = rnd(scale=0.3)
            buffers = {"resample_filter": _kernel(), "noise_const": torch.randn(res, res, generator=g)}
        for key, value in {**params, **buffers}.items():
            flat[f"{name}.{key}"] = value
        return _Persistent("ToRGBLayer" if torgb else "SynthesisLayer", params, buffers, {"affine": affine},
                           conv_clamp=conv_clamp, up=2 if up else 1, resolution=res)

    blocks = {}
    const = rnd(CHANNELS[0], 4, 4)
    flat["synthesis.b4.const"] = const
    for index, res in enumerate((4, 8, 16, 32)):
        cin, cout = CHANNELS[max(index - 1, 0)], CHANNELS[index]
        modules = {} if res == 4 else {"conv0": layer(f"synthesis.b{res}.conv0", cin, cout, res, True)}
        modules["conv1"] = layer(f"synthesis.b{res}.conv1", cout, cout, res, False)
        modules["torgb"] = layer(f"synthesis.b{res}.torgb", cout, 3, res, False, torgb=True)
        blocks[f"b{res}"] = _Persistent("SynthesisBlock", {"const": const} if res == 4 else {},
                                        {"resample_filter": _kernel()}, modules, architecture="skip", resolution=res)
    synthesis = _Persistent("SynthesisNetwork", {}, {}, blocks, w_dim=DIM, img_resolution=RES)
    return flat, _Persistent("Generator", {}, {}, {"mapping": mapping, "synthesis": synthesis}, z_dim=DIM, w_dim=DIM)


def _stub_nvidia_modules():
    """Module names the NVIDIA pickles reference, so `pickle` can name them when we write."""
    persistence = types.ModuleType("torch_utils.persistence")
    util = types.ModuleType("dnnlib.util")

    def _reconstruct_persistent_obj(meta):  # never called here: we only write
        raise AssertionError

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    easydict = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    util.EasyDict = easydict
    return {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
            "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util}


def write_nvidia_pkl(path, generator: _Persistent, extra=None):
    stubs = _stub_nvidia_modules()
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        with open(path, "wb") as f:
            easydict = stubs["dnnlib.util"].EasyDict
            pickle.dump({**(extra or {}), "G": generator, "D": None, "G_ema": generator,
                         "training_set_kwargs": easydict(resolution=RES), "augment_pipe": None}, f,
                        protocol=pickle.HIGHEST_PROTOCOL)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _ws(seed, n=3):
    return torch.randn(n, 2 * len(CHANNELS), DIM, generator=torch.Generator().manual_seed(seed))


# ---- tests -------------------------------------------------------------------------------------


def test_rosinality_pt_imports_and_reproduces_the_reference(fresh_repo, tmp_path):
    sd, latent_avg = rosinality_state(1)
    path = tmp_path / "ffhq-tiny.pt"
    torch.save({"g_ema": sd, "latent_avg": latent_avg}, path)
    entry = import_checkpoint(fresh_repo, path, "tiny-ros")
    model = load_generator(fresh_repo.resolve("tiny-ros"))
    assert entry.manifest["config"]["channels"] == CHANNELS and model.num_ws == 8 and model.spec.resolution == RES
    assert entry.manifest["provenance"]["format"] == "rosinality-pt"
    ws = _ws(0)
    with torch.no_grad():
        ours, ref = model(ws), rosinality_forward(sd, ws)
        assert (ours - ref).abs().max().item() < 1e-4
        z = torch.randn(4, DIM, generator=torch.Generator().manual_seed(5))
        layers = [(sd[f"style.{j}.weight"], sd[f"style.{j}.bias"]) for j in range(1, MLP + 1)]
        assert (model.map_latents(z, "w") - ref_mapping(z, layers)).abs().max().item() < 1e-4
    torch.testing.assert_close(model.mapping.w_avg, latent_avg[0])
    assert model.spec.supports_truncation


def test_nvidia_pkl_imports_through_the_restricted_unpickler_and_reproduces_the_reference(fresh_repo, tmp_path,
                                                                                           monkeypatch):
    marker = tmp_path / "module_src_ran"
    monkeypatch.setitem(__builtins__ if isinstance(__builtins__, dict) else __builtins__.__dict__, "MARKER", str(marker))
    flat, generator = nvidia_state(2, conv_clamp=0.5)  # a clamp that bites, so it must be honoured
    path = tmp_path / "network-snapshot.pkl"
    write_nvidia_pkl(path, generator)
    import_checkpoint(fresh_repo, path, "tiny-nv")
    model = load_generator(fresh_repo.resolve("tiny-nv"))
    ws = _ws(1)
    with torch.no_grad():
        ours, ref = model(ws), nvidia_forward(flat, ws, clamp=0.5)
        assert (ours - ref).abs().max().item() < 1e-4
        z = torch.randn(4, DIM, generator=torch.Generator().manual_seed(5))
        layers = [(flat[f"mapping.fc{i}.weight"], flat[f"mapping.fc{i}.bias"]) for i in range(MLP)]
        assert (model.map_latents(z, "w") - ref_mapping(z, layers)).abs().max().item() < 1e-4
    torch.testing.assert_close(model.mapping.w_avg, flat["mapping.w_avg"])
    assert not marker.exists()  # the embedded module source was never executed


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (exec, (f"open({str(self.target)!r}, 'w').write('pwned')",))


def test_a_pickle_with_a_malicious_reduce_is_refused_and_never_runs(fresh_repo, tmp_path):
    target = tmp_path / "pwned"
    _, generator = nvidia_state(3)
    path = tmp_path / "evil.pkl"
    write_nvidia_pkl(path, generator, extra={"payload": _Evil(target)})
    with open(path, "rb") as f, pytest.raises(ModuleNotFoundError):  # really malicious: a plain unpickle runs it
        pickle.load(f)  # (and then fails to import torch_utils, which this machine does not have)
    assert target.read_text() == "pwned"
    target.unlink()
    with pytest.raises(CheckpointError, match=r"pickle refused: it names builtins\.exec"):
        import_checkpoint(fresh_repo, path, "evil")
    assert not target.exists()
    assert "evil" not in fresh_repo.names()
    # a torch.save'd .pt with the same payload is refused by weights_only
    pt = tmp_path / "evil.pt"
    torch.save({"g_ema": rosinality_state(1)[0], "args": _Evil(target)}, pt)
    with pytest.raises(CheckpointError, match="weights_only"):
        import_checkpoint(fresh_repo, pt, "evil")
    assert not target.exists()


def test_mismatching_shapes_name_the_first_bad_tensor(fresh_repo, tmp_path):
    sd, latent_avg = rosinality_state(4)
    sd["convs.2.conv.modulation.weight"] = torch.randn(CHANNELS[1] + 1, DIM)  # block 16's conv0: one style too many
    path = tmp_path / "bad.pt"
    torch.save({"g_ema": sd, "latent_avg": latent_avg}, path)
    with pytest.raises(CheckpointError, match=r"tensor convs\.2\.conv\.modulation\.weight has shape \[11, 16\]; .* needs "
                                              r"\[10, 16\]") as caught:
        import_checkpoint(fresh_repo, path, "bad")
    assert isinstance(caught.value, InvalidArgument)
    flat, generator = nvidia_state(5)
    generator.modules["synthesis"].modules["b8"].modules["conv1"].params["bias"] = torch.nn.Parameter(torch.zeros(3))
    pkl = tmp_path / "bad.pkl"
    write_nvidia_pkl(pkl, generator)
    with pytest.raises(CheckpointError, match=r"tensor synthesis\.b8\.conv1\.bias has shape \[3\]"):
        convert(pkl)


def test_a_checkpoint_without_w_avg_has_no_truncation(fresh_repo, tmp_path):
    sd, _ = rosinality_state(6)
    path = tmp_path / "no-avg.pt"
    torch.save({"g_ema": sd}, path)
    import_checkpoint(fresh_repo, path, "no-avg")
    model = load_generator(fresh_repo.resolve("no-avg"))
    assert not model.spec.supports_truncation
    with pytest.raises(InvalidArgument, match="w_avg"):
        model.sample(model.spec.space("w"), 2, 0, truncation_psi=0.5)
    assert np.isfinite(model.sample(model.spec.space("w"), 2, 0)).all()


def test_cli_models_import_converts_a_checkpoint_and_reports_bad_files(fresh_repo, tmp_path, capsys):
    """`latentedit models import PATH --name NAME`: the entry appears in the repository; a missing
    file, a malicious pickle and a name that is a path each end in one line and exit 1."""
    from latentedit.cli import main

    config = tmp_path / "config.yaml"
    config.write_text(f"repository: {fresh_repo.root}\nsecurity:\n  insecure: true\n")
    sd, latent_avg = rosinality_state(3)
    path = tmp_path / "mine.pt"
    torch.save({"g_ema": sd, "latent_avg": latent_avg}, path)
    assert main(["--config", str(config), "models", "import", str(path), "--name", "my-faces"]) == 0
    assert "imported my-faces v1" in capsys.readouterr().out
    assert fresh_repo.resolve("my-faces").manifest["provenance"]["format"] == "rosinality-pt"

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"G_ema": Exploit()}))
    for argv, expected in (
        ([str(tmp_path / "absent.pt"), "--name", "x"], "no such file"),
        ([str(evil), "--name", "evil"], "evil.pkl"),
        ([str(path), "--name", "../outside"], "name"),
    ):
        assert main(["--config", str(config), "models", "import", *argv]) == 1, argv
        captured = capsys.readouterr()
        assert "pwned" not in captured.out
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (argv, captured.err)
    assert fresh_repo.versions("my-faces") == [1]
