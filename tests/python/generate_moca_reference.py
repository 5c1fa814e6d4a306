#!/usr/bin/env python3
"""Writes tests/data/moca_reference.safetensors: three MOCA training iterations computed by
tests/python/reference_moca.py in float64, for the C++ trainer tests.

Configuration (also in the header metadata "config" as JSON, and as `cfg.<key>` tensors [1]):
  image 8x8, patch 2 (G=4, L=16), 1 channel, encoder 16-d / depth 3 / 2 heads, early_layer 1
  (decoder input = raw output of block 1), decoder 12-d / 1 block / 2 heads, K=32 words,
  skip_offset 1 (inner patches 5, 6, 9, 10), kappa 3, inv_delta 10, 4 words per iteration,
  generator hidden 32 (pred_mlp_ratio 2 x encoder width, both generators), lk = (7, 4),
  ld = (10, 7), img/loc weights 0.5/0.5, B = 4 image pairs (student batch 8).

Tensors (float64 unless noted; scalars are shape [1] except BN num_batches_tracked):
  cfg.<key>               int64 [1]: img_size patch in_chans dim depth heads dec_dim dec_depth
                          dec_heads early_layer num_words skip_offset words_per_iter pred_hidden
                          batch lk0 lk1 ld0 ld1 iterations; float64 [1]: kappa inv_delta
                          img_weight loc_weight
  <name>                  initial state under the official state-dict names (spec §11.6): all
                          of Moca.state_dict() - encoder.*, encoder_teacher.* (incl. frozen
                          pos_embed), encoder_pred.scale, encoder_pred.layers_w.0.generator.
                          {b0_fc.weight, b0_bn.{weight,bias,running_mean,running_var,
                          num_batches_tracked (int64, shape [])}, b0_last_layer.{weight,bias}},
                          decoder_pred.* (same + layers_w.0.skip.{weight,bias}),
                          bow_extractor.bow_extractor.0.{_embedding [K,C], _embedding_ptr (int64
                          [1]), _track_num_batches, _dist_norm, _dist_norm_prev},
                          decoder_pos_embed [1,17,12], norm_cls_pt.*, decoder_embed_cls_pt.*,
                          mask_token_cls_pt, decoder_blocks_cls_pt.0.*, decoder_norm_cls_pt.*
  it<t>.x1, it<t>.x2      views [4,1,8,8]                                       (t = 0, 1, 2)
  it<t>.s1                round-1 permutation [8,16] int64 (argsort of uniform noise per row)
  it<t>.s2                derived round-2 permutation [8,16] int64: cat(Cv, Bm, R[4:], A) with
                          A = s1[:7], Bm = s1[7:10], R = s1[10:], Cv = R[:4]
  it<t>.view              int64 [1]: 0 = teacher output of x1 feeds the codebook, 1 = of x2
  it<t>.img_idx           int64 [4]: distinct image indices (a randperm of B)
  it<t>.tok_idx           int64 [4]: inner-region index i in 0..3 (row-major inner 2x2)
  it<t>.tok               int64 [4]: the token read, 1 + patch, patch = (1 + i//2)*4 + 1 + i%2
  it<t>.lr, .wd, .momentum  schedule values of the iteration
  it<t>.teacher_out1/2    teacher output after EMA, after final LN [4,17,16]
  it<t>.stat1/2           per-view dist_norm statistic |mean(meanD - minD)|
  it<t>.q1, it<t>.q2      codes [4,16,32];  it<t>.y1, it<t>.y2  BoW [4,32]
  it<t>.Wb [32,16], it<t>.Wd [32,12]  prototypes from the pre-update codebook snapshot
  it<t>.g0, it<t>.g1      global embeddings of rounds 0 and 1 [8,16]
  it<t>.dec_out0 [80,12], it<t>.dec_out1 [56,12]  decoder outputs (after LN_d, global dropped)
  it<t>.l_img0/1, it<t>.l_loc0/1  per-round KL terms; it<t>.l_img, .l_loc, .loss totals
  it<t>.grad.<name>       gradient of every trainable parameter, BEFORE clipping
  it<t>.grad_norm         global grad norm before clipping (clip_grad_norm_ return value)
  it<t>.after.<name>      the complete state_dict after the iteration (optimizer step done,
                          teacher EMA'd, codebook/ptr/dist_norm/dist_norm_prev/BN stats updated)

Notes for a port: the teacher EMA runs first; codes use dist_norm_prev; dist_norm is updated
twice per iteration (view 1, then view 2); dist_norm_prev <- dist_norm at the codebook update;
ptr starts at 28, so the 4 new words of iteration 0 fill rows 28..31 and ptr wraps to 0. The
generator BatchNorm runs in training mode over the 32 codebook rows; its running_var update
uses the UNBIASED batch variance (PyTorch semantics), running stats have momentum 0.1 and
num_batches_tracked counts once per iteration per generator. The pos tables are float32
sin-cos values widened to float64 (load them from the file). AdamW state starts empty; all
four groups step every iteration (lr 0 on iteration 0 still advances Adam's moments).

Self-checks (asserted before writing): mask lengths for L = 196, Q/Y rows sum to 1, losses >= 0,
teacher == student unmasked output, spec §14 gradient flow, float64 finite differences.

The fixture is committed; CI needs no Python. To regenerate (torch from Debian's python3-torch,
safetensors from PyPI):
    python3 -m venv --system-site-packages .venv && .venv/bin/pip install safetensors
    .venv/bin/python tests/python/generate_moca_reference.py
"""
import copy
import json
import pathlib

import torch
from safetensors.torch import save_file

from reference_moca import (Moca, complementary_second_round, inner_patches, len_keep,
                            make_optimizer, student_losses, teacher_targets, train_iteration)

CONFIG = dict(img_size=8, patch=2, in_chans=1, dim=16, depth=3, heads=2, dec_dim=12,
              dec_depth=1, dec_heads=2, early_layer=1, num_words=32, skip_offset=1, kappa=3.0,
              inv_delta=10.0, words_per_iter=4, pred_mlp_ratio=2.0, mask_ratio=(0.55, 0.75),
              dec_mask_ratio=(0.35, 0.55), img_weight=0.5, loc_weight=0.5)
B = 4
SCHEDULE = [dict(lr=0.0, wd=0.05, momentum=0.994),
            dict(lr=2e-3, wd=0.06, momentum=0.995),
            dict(lr=3e-3, wd=0.07, momentum=0.996)]
TEACHER_NOISE = 0.05
DIST_NORM, DIST_NORM_PREV, PTR = 0.4, 0.3, 28


def build_model():
    torch.manual_seed(0)
    model = Moca(**CONFIG)
    model.init_weights()
    model = model.double()
    with torch.no_grad():  # non-trivial norms and biases, so every path carries gradient
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if ("norm" in name or "_bn" in name) and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.uniform_(-0.3, 0.3)
        teacher = dict(model.encoder_teacher.named_parameters())
        for name, p in model.encoder.named_parameters():
            if p.requires_grad:   # the teacher is close to, not equal to, the student
                teacher[name].copy_(p + TEACHER_NOISE * torch.randn_like(p))
        bow = model.bow
        assert (bow._embedding.norm(dim=1) > 0.5).all()
        bow._dist_norm.fill_(DIST_NORM)
        bow._dist_norm_prev.fill_(DIST_NORM_PREV)
        bow._embedding_ptr.fill_(PTR)
    return model


def make_inputs(model):
    L = model.L
    its = []
    for sched in SCHEDULE:
        x1 = torch.rand(B, CONFIG["in_chans"], CONFIG["img_size"], CONFIG["img_size"],
                        dtype=torch.float64) * 2 - 1
        x2 = torch.rand_like(x1) * 2 - 1
        s1 = torch.argsort(torch.rand(2 * B, L, dtype=torch.float64), dim=1)
        view = torch.randint(0, 2, [1])
        img_idx = torch.randperm(B)[:CONFIG["words_per_iter"]]
        tok_idx = torch.randint(0, len(model.bow.inner), [CONFIG["words_per_iter"]])
        its.append((dict(x1=x1, x2=x2), dict(s1=s1, view=view, img_idx=img_idx, tok_idx=tok_idx),
                    sched))
    return its


def masks_for(model, s1):
    s2 = complementary_second_round(s1, model.lk[0], model.ld[0], model.lk[1])
    return [(s1, model.lk[0], model.ld[0]), (s2, model.lk[1], model.ld[1])]


# ---------------------------------------------------------------------------------- self-checks

def check_mask_lengths():
    """Spec §11.7 identities for L = 196 with the mask function used here."""
    L = 196
    lk1, ld1, lk2, ld2 = (len_keep(L, r) for r in (0.55, 0.35, 0.75, 0.55))
    assert (lk1, ld1, lk2, ld2) == (88, 127, 49, 88)
    s1 = torch.argsort(torch.rand(3, L, generator=torch.Generator().manual_seed(1)), dim=1)
    s2 = complementary_second_round(s1, lk1, ld1, lk2)
    for a, b in zip(s1.tolist(), s2.tolist()):
        assert sorted(b) == list(range(L))
        A, Bm = set(a[:lk1]), set(a[lk1:ld1])
        assert len(Bm) == 39 and set(b[lk2:ld2]) == Bm
        assert not (set(b[:lk2]) & (A | Bm))
        assert set(b[:ld2]) == set(b[:lk2]) | Bm
        assert L - len(set(a[:ld1]) | set(b[:ld2])) == 20
    # this fixture's configuration
    assert (len_keep(16, 0.55), len_keep(16, 0.35), len_keep(16, 0.75), len_keep(16, 0.55)) \
        == (7, 10, 4, 7)
    assert inner_patches(4, 1).tolist() == [5, 6, 9, 10]
    assert inner_patches(14, 2)[0].item() == 30 and inner_patches(14, 2)[-1].item() == 165
    return "mask lengths 88/127/49/88, |Bm| 39, 20 unused; fixture 7/10/4/7, inner [5,6,9,10]"


def check_teacher_identity(model, x):
    m = copy.deepcopy(model)
    m.encoder_teacher.load_state_dict(m.encoder.state_dict())
    with torch.no_grad():
        t = m.encoder_teacher(x)[0]
        s = m.encoder(x)[0]
        s_all = m.encoder(x, torch.arange(m.L).expand(x.shape[0], -1))[0]
    assert torch.equal(t, s), "teacher copy differs from the student"
    assert torch.equal(s, s_all), "keeping all tokens differs from the unmasked path"
    return "teacher copy == student (exact); all-kept mask == unmasked (exact)"


def grads_of(model, loss, names):
    params = dict(model.named_parameters())
    gs = torch.autograd.grad(loss, [params[n] for n in names], retain_graph=True,
                             allow_unused=True)
    return {n: (torch.zeros_like(params[n]) if g is None else g) for n, g in zip(names, gs)}


def check_gradient_flow(model, batch, plan):
    """Spec §14 on a copy of the model (targets and codebook snapshot are constants)."""
    m = copy.deepcopy(model)
    edict = m.bow._embedding.clone()
    tg = teacher_targets(m, batch["x1"], batch["x2"], edict)
    Q, Y = torch.cat([tg["q1"], tg["q2"]]), torch.cat([tg["y2"], tg["y1"]])
    X = torch.cat([batch["x1"], batch["x2"]])
    masks = masks_for(m, plan["s1"])
    names = [n for n, _ in m.trainable()]
    out = student_losses(m, X, masks, Q, Y, edict)
    g_img = grads_of(m, out["l_img"], names)
    g_loc = grads_of(m, out["l_loc"], names)
    out_d = student_losses(m, X, masks, Q, Y, edict, detach_g_for_loc=True)
    g_loc_d = grads_of(m, out_d["l_loc"], names)
    assert torch.equal(out_d["l_loc"], out["l_loc"])
    out["loss"].backward()
    assert all(p.grad is None for p in m.encoder_teacher.parameters()), "teacher got a gradient"
    assert not m.bow._embedding.requires_grad and edict.grad is None
    assert not Q.requires_grad and not Y.requires_grad
    assert all(p.grad is None for n, p in m.named_parameters() if not p.requires_grad)

    nz = lambda g: g.abs().max().item() > 0
    depth, early = CONFIG["depth"], CONFIG["early_layer"]
    late = tuple(f"encoder.blocks.{i}." for i in range(depth - early, depth)) + ("encoder.norm.",)
    dec = ("norm_cls_pt", "decoder_embed_cls_pt", "mask_token_cls_pt", "decoder_blocks_cls_pt",
           "decoder_norm_cls_pt")
    for n in names:
        if n.startswith("encoder_pred."):
            assert nz(g_img[n]) and not nz(g_loc[n]), n          # G^b: L_IMG only
        elif n.startswith("decoder_pred."):
            assert not nz(g_img[n]) and nz(g_loc[n]), n          # G^d: L_LOC only
        elif n.startswith(dec):
            assert not nz(g_img[n]) and nz(g_loc[n]), n          # decoder: L_LOC only
        elif n.startswith(late):                                  # late blocks: L_LOC via g_r only
            assert nz(g_img[n]) and nz(g_loc[n]) and not nz(g_loc_d[n]), n
        else:                                                     # patch, cls, early blocks
            assert n.startswith("encoder.") and nz(g_img[n]) and nz(g_loc_d[n]), n
            assert not torch.allclose(g_loc_d[n], g_loc[n]), n   # g_r adds a contribution
        assert torch.allclose(m.get_parameter(n).grad, 0.5 * g_img[n] + 0.5 * g_loc[n],
                              rtol=1e-10, atol=1e-14), n
    return (f"{len(names)} trainable tensors: G^b L_IMG-only, G^d/decoder L_LOC-only, "
            f"late blocks + final LN get L_LOC only through g_r, teacher/codebook no grad")


def check_finite_differences(model, batch, plan, per_group=3, h=1e-6):
    """Central differences of the total loss (masks and snapshot fixed) vs autograd."""
    m = copy.deepcopy(model)
    edict = m.bow._embedding.clone()
    tg = teacher_targets(m, batch["x1"], batch["x2"], edict)
    Q, Y = torch.cat([tg["q1"], tg["q2"]]), torch.cat([tg["y2"], tg["y1"]])
    X = torch.cat([batch["x1"], batch["x2"]])
    masks = masks_for(m, plan["s1"])
    loss_fn = lambda: student_losses(m, X, masks, Q, Y, edict)["loss"]
    loss_fn().backward()
    groups = {
        "decoder": ["norm_cls_pt.weight", "decoder_embed_cls_pt.weight",
                    "decoder_blocks_cls_pt.0.attn.qkv.weight", "decoder_blocks_cls_pt.0.mlp.fc2.bias",
                    "decoder_norm_cls_pt.bias"],
        "generators": ["encoder_pred.layers_w.0.generator.b0_fc.weight",
                       "encoder_pred.layers_w.0.generator.b0_bn.weight",
                       "decoder_pred.layers_w.0.generator.b0_last_layer.weight",
                       "decoder_pred.layers_w.0.skip.weight",
                       "decoder_pred.layers_w.0.generator.b0_bn.bias"],
        "encoder_early": ["encoder.patch_embed.proj.weight", "encoder.blocks.0.attn.qkv.weight",
                          "encoder.blocks.1.mlp.fc1.weight", "encoder.blocks.1.norm2.weight"],
        "encoder_late": ["encoder.blocks.2.attn.proj.weight", "encoder.blocks.2.mlp.fc2.weight",
                         "encoder.norm.weight", "encoder.norm.bias"],
        "cls_token": ["encoder.cls_token"],
        "mask_token": ["mask_token_cls_pt"],
    }
    gen = torch.Generator().manual_seed(2)
    worst = 0.0
    count = 0
    with torch.no_grad():
        for gname, pnames in groups.items():
            for pname in pnames:
                p = m.get_parameter(pname)
                flat = p.view(-1)
                for i in torch.randint(0, flat.numel(), [per_group], generator=gen).tolist():
                    old = flat[i].item()
                    flat[i] = old + h
                    fp = loss_fn().item()
                    flat[i] = old - h
                    fm = loss_fn().item()
                    flat[i] = old
                    fd = (fp - fm) / (2 * h)
                    ad = p.grad.view(-1)[i].item()
                    err = abs(fd - ad) / max(abs(ad), 1e-4)
                    assert err < 1e-5, f"finite differences: {gname} {pname}[{i}] fd {fd} ad {ad}"
                    worst, count = max(worst, err), count + 1
    return f"{count} entries in {len(groups)} groups, worst relative error {worst:.2e}"


# ---------------------------------------------------------------------------------------- main

def scalar(v, dtype=torch.float64):
    return torch.tensor([float(v) if dtype == torch.float64 else int(v)], dtype=dtype)


def main():
    model = build_model()
    its = make_inputs(model)
    checks = [check_mask_lengths(),
              check_teacher_identity(model, its[0][0]["x1"]),
              check_gradient_flow(model, *its[0][:2]),
              check_finite_differences(model, *its[0][:2])]

    out = {n: t.detach().clone() for n, t in model.state_dict().items()}
    opt = make_optimizer(model)
    for t, (batch, plan, sched) in enumerate(its):
        rec = train_iteration(model, opt, batch, plan, sched)
        pre = f"it{t}."
        for k in ("Q", "Y"):   # codes and BoW are distributions
            assert torch.allclose(rec[k].sum(-1), torch.ones((), dtype=torch.float64), atol=1e-12)
        for k in ("l_img", "l_loc", "loss"):
            assert rec[k].item() >= 0
        ip = inner_patches(4, 1)
        assert torch.equal(rec["tok"], 1 + (1 + plan["tok_idx"] // 2) * 4 + 1 + plan["tok_idx"] % 2)
        assert torch.equal(rec["tok"], 1 + ip[plan["tok_idx"]])
        vals = dict(x1=batch["x1"], x2=batch["x2"], s1=plan["s1"], s2=rec["s2"],
                    view=plan["view"].reshape(1), img_idx=plan["img_idx"],
                    tok_idx=plan["tok_idx"], tok=rec["tok"],
                    lr=scalar(sched["lr"]), wd=scalar(sched["wd"]),
                    momentum=scalar(sched["momentum"]),
                    teacher_out1=rec["teacher_out1"], teacher_out2=rec["teacher_out2"],
                    stat1=rec["stat1"].reshape(1), stat2=rec["stat2"].reshape(1),
                    q1=rec["q1"], q2=rec["q2"], y1=rec["y1"], y2=rec["y2"],
                    Wb=rec["Wb"], Wd=rec["Wd"], g0=rec["g"][0], g1=rec["g"][1],
                    dec_out0=rec["dec_out"][0], dec_out1=rec["dec_out"][1],
                    l_img0=rec["l_img_r"][0].reshape(1), l_img1=rec["l_img_r"][1].reshape(1),
                    l_loc0=rec["l_loc_r"][0].reshape(1), l_loc1=rec["l_loc_r"][1].reshape(1),
                    l_img=rec["l_img"].reshape(1), l_loc=rec["l_loc"].reshape(1),
                    loss=rec["loss"].reshape(1), grad_norm=rec["grad_norm"].reshape(1))
        for k, v in vals.items():
            out[pre + k] = v.detach().clone()
        for n, g in rec["grads"].items():
            out[pre + "grad." + n] = g
        for n, v in model.state_dict().items():
            out[pre + "after." + n] = v.detach().clone()
        print(f"iteration {t}: l_img {rec['l_img'].item():.17g} l_loc {rec['l_loc'].item():.17g} "
              f"loss {rec['loss'].item():.17g} grad_norm {rec['grad_norm'].item():.17g}")
    # lr 0 on iteration 0: only the generators (constant lr) move; Adam moments still accumulate
    for n, _ in model.trainable():
        same = torch.equal(out["it0.after." + n], out[n])
        assert same != n.startswith(("encoder_pred.", "decoder_pred.")), n
    # iteration 0 wraps the ring pointer: rows 28..31 replaced, ptr back to 0
    assert out["it0.after.bow_extractor.bow_extractor.0._embedding_ptr"].item() == 0
    assert out["it2.after.bow_extractor.bow_extractor.0._embedding_ptr"].item() == 8

    cfg = dict(CONFIG, batch=B, lk=model.lk, ld=model.ld, pred_hidden=int(16 * 2.0),
               teacher_noise=TEACHER_NOISE, dist_norm=DIST_NORM, dist_norm_prev=DIST_NORM_PREV,
               ptr=PTR, clip=0.1, lr_wgen=1e-4, wd_wgen=0.05, betas=[0.9, 0.999], adam_eps=1e-8)
    ints = dict(img_size=8, patch=2, in_chans=1, dim=16, depth=3, heads=2, dec_dim=12,
                dec_depth=1, dec_heads=2, early_layer=1, num_words=32, skip_offset=1,
                words_per_iter=4, pred_hidden=32, batch=B, lk0=model.lk[0], lk1=model.lk[1],
                ld0=model.ld[0], ld1=model.ld[1], iterations=len(its))
    for k, v in ints.items():
        assert k not in CONFIG or CONFIG[k] == v
        out["cfg." + k] = scalar(v, torch.int64)
    for k in ("kappa", "inv_delta", "img_weight", "loc_weight"):
        out["cfg." + k] = scalar(CONFIG[k])

    path = pathlib.Path(__file__).resolve().parent.parent / "data" / "moca_reference.safetensors"
    save_file({k: v.contiguous() for k, v in out.items()}, str(path),
              # one metadata key: the writer keeps metadata in a hash map, so several keys
              # would come out in a random order and the file would not be reproducible
              metadata={"config": json.dumps(dict(
                  cfg, generator="tests/python/generate_moca_reference.py",
                  torch=torch.__version__))})
    for c in checks:
        print("check:", c)
    print(f"wrote {path} ({len(out)} tensors, {path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
