import pytest
import torch

from memit_pl.config import MemitConfig, TrainerConfig
from memit_pl.data.edits import EditRequest, target_ids
from memit_pl.functional.losses import (
    RowAdam,
    clamp_rows,
    essence_kl,
    mean_per_edit,
    target_nll,
    target_nll_flat,
)
from memit_pl.modeling.hooks import edit_output
from memit_pl.modeling.spec import get_spec
from memit_pl.modeling.tail import Tail, align, record_tail, record_tail_cached
from memit_pl.modeling.tokens import tokenize_with_subject
from memit_pl.stages.zbatch import build_z_batch, by_live_length, live_length
from memit_pl.stages.zopt import optimize_z
from tests.support.tiny import FAMILIES
from tests.support.z_reference import reference_z

REQUESTS = [
    EditRequest("0", "Michael Jordan", "{} plays the sport of", "soccer"),
    EditRequest("1", "France", "The capital of {} is", "Rome"),
    EditRequest("2", "Toyota", "{} is a car company from", "Japan"),
    EditRequest("3", "Albert Einstein", "{} was a famous", "baseball player"),
]
PREFIXES = ["", "It was a sunny day. ", "Therefore, I think "]


@pytest.mark.parametrize("family", FAMILIES)
def test_tail_rerun_equals_full_forward(make_model, tok, family):
    model = make_model(family)
    spec = get_spec(model)
    enc = tok(["The capital of France is", "Paris is a city in the world of"], return_tensors="pt", padding=True)
    full = model(**enc).logits
    tail = record_tail(model, spec, 1, enc.input_ids, enc.attention_mask)
    torch.testing.assert_close(Tail.logits(model, spec, tail.run(model, tail.hidden)), full, atol=1e-5, rtol=1e-5)
    rows = torch.tensor([1])
    one = Tail.logits(model, spec, tail.run(model, tail.hidden[rows], rows=rows))
    torch.testing.assert_close(one[0], full[1], atol=1e-5, rtol=1e-5)


def test_align_keeps_tokens_and_positions(tok):
    enc = tok(["The capital of France is", "Paris is a city", "Toyota"], return_tensors="pt", padding=True)
    at = torch.tensor([3, 1, 0])
    ids, mask, pos, shift = align(enc.input_ids, enc.attention_mask, at)
    assert shift.tolist() == [0, 2, 3]
    for r in range(3):
        n = int(enc.attention_mask[r].sum())
        cols = torch.arange(n) + shift[r]
        assert torch.equal(ids[r, cols], enc.input_ids[r, :n])
        assert torch.equal(pos[r, cols], torch.arange(n))
        assert int(mask[r].sum()) == n
        assert ids[r, 3] == enc.input_ids[r, at[r]]  # every row's edit position in one column


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_tail_equals_full_forward(make_model, tok, family):
    """The tail re-run from the aligned edit column on, attending to the cached earlier columns,
    gives the full forward pass's logits (also for a subset of rows)."""
    model = make_model(family).double()
    spec = get_spec(model)
    enc = tok(["The capital of France is Paris", "Paris is a city in the world of", "Toyota is"],
              return_tensors="pt", padding=True)
    at = torch.tensor([3, 1, 0])
    full = model(**enc).logits
    tail = record_tail_cached(model, spec, 1, enc.input_ids, enc.attention_mask, at)
    assert tail.hidden.shape[1] < enc.input_ids.shape[1]
    out = Tail.logits(model, spec, tail.run(model, tail.hidden))
    for rows in (None, torch.tensor([2, 0])):
        got = out if rows is None else Tail.logits(model, spec, tail.run(model, tail.hidden[rows], rows=rows))
        for i, r in enumerate(range(3) if rows is None else rows.tolist()):
            n = int(enc.attention_mask[r].sum())
            cols = tail.col(torch.tensor([r]), torch.arange(int(at[r]), n))
            # float64 model; one AMD EPYC gave differences of 3.7e-8 (float32-sized: some op's kernel path
            # differs between the two shapes). A wrong position or mask is off by O(1).
            torch.testing.assert_close(got[i, cols], full[r, int(at[r]) : n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_changes_nothing(make_model, tok, family):
    """z, losses and early-stop steps with and without the prefix cache (float64)."""
    model = make_model(family).double()
    spec = get_spec(model)
    batch = build_z_batch(tok, REQUESTS + ENDING, PREFIXES)
    out = {}
    for cached in (True, False):
        cfg = MemitConfig(layers=[1, 2], v_num_grad_steps=6, v_lr=0.05, v_loss_threshold=6.2,
                          clamp_norm_factor=20.0, v_weight_decay=0.01, z_prefix_cache=cached)
        out[cached] = optimize_z(model, spec, batch, cfg)
    assert out[True].steps.tolist() == out[False].steps.tolist()
    assert ((out[True].z - out[False].z).norm(dim=-1) / out[False].z.norm(dim=-1)).max() <= 1e-8
    torch.testing.assert_close(out[True].loss, out[False].loss, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("cached", [True, False])
def test_essence_rows_end_at_the_subject(make_model, tok, cached):
    """The essence rows get their own tail, cut after the subject's last token: with the prefix cache a
    step re-runs one column per essence row; the KL term it reads is the full prompt's."""
    from memit_pl.stages.zopt import _Rows

    model = make_model("llama").double()
    spec = get_spec(model)
    batch = build_z_batch(tok, REQUESTS, PREFIXES)
    cfg = MemitConfig(layers=[1], z_prefix_cache=cached)
    es = _Rows.record(model, spec, cfg, batch, batch.essence_rows, cut_after_lookup=True)
    rw = _Rows.record(model, spec, cfg, batch, batch.rewrite_rows, cut_after_lookup=False)
    if cached:
        assert es.tail.hidden.shape[1] == 1 < rw.tail.hidden.shape[1]
    else:
        assert es.tail.hidden.shape[1] == int(batch.lookup[batch.essence_rows].max()) + 1
    full = model(input_ids=batch.input_ids[batch.essence_rows], attention_mask=batch.attention_mask[batch.essence_rows]).logits
    _, normed = es.run(model, torch.zeros(len(REQUESTS), model.config.hidden_size, dtype=torch.float64),
                       torch.arange(len(REQUESTS)))
    got = Tail.logits(model, spec, normed[torch.arange(len(REQUESTS)), es.lookup])
    # 1e-7: the model's own forward pass differs by ~1e-8 between the cut and the full prompt here
    torch.testing.assert_close(got, full[torch.arange(len(REQUESTS)), batch.lookup[batch.essence_rows]], atol=1e-7, rtol=1e-7)


def test_z_batch_layout(tok):
    b = build_z_batch(tok, REQUESTS, PREFIXES, "{} is a")
    assert b.input_ids.shape[0] == len(REQUESTS) * (len(PREFIXES) + 1)
    for row, (pos, ids) in zip(b.rewrite_rows.tolist(), zip(b.target_pos, b.target_ids)):
        for p, t in zip(pos.tolist(), ids.tolist()):
            if t == -100:
                continue
            assert b.attention_mask[row, p] == 1
            if p + 1 < b.input_ids.shape[1] and b.attention_mask[row, p + 1]:
                assert b.input_ids[row, p + 1] == t  # teacher forcing: the next input is the target
    # the lookup of each row points at the subject's last token
    for row in range(b.input_ids.shape[0]):
        subject = REQUESTS[int(b.edit_of_row[row])].subject
        piece = tok.decode(b.input_ids[row, b.lookup[row]]).strip()
        assert piece and subject.endswith(piece)
    assert b.init_rows.tolist() == [e * (len(PREFIXES) + 1) for e in range(len(REQUESTS))]


ENDING = [  # prompts that end with the subject: the edited position predicts, so losses move
    EditRequest(str(i), s, "The answer to the question about {}", t)
    for i, (s, t) in enumerate([("France", "Rome"), ("Toyota", "Japan"), ("Einstein", "soccer"), ("Michael Jordan", "baseball player")])
]


def _stopping_steps(losses: torch.Tensor, threshold: float) -> list[int]:
    """losses [steps, n_edits] -> the step at which each edit first falls below the threshold."""
    below = losses < threshold
    last = losses.shape[0] - 1
    return [int(below[:, i].nonzero()[0]) if below[:, i].any() else last for i in range(losses.shape[1])]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_z_equals_one_edit_at_a_time(make_model, tok, family):
    """float64 removes rounding noise, so any difference would be a logic difference; the early-stop
    threshold is chosen so that the edits stop at different steps."""
    model = make_model(family).double()
    spec = get_spec(model)
    reqs = REQUESTS[:2] + ENDING
    cfg = MemitConfig(layers=[1, 2], v_num_grad_steps=1, v_lr=0.05, v_loss_threshold=0.0, clamp_norm_factor=20.0,
                      v_weight_decay=0.01)
    batch = build_z_batch(tok, reqs, PREFIXES)
    traj = []  # with n steps allowed, the reported loss is the loss after n-1 Adam steps
    for n in range(1, 13):
        cfg.v_num_grad_steps = n
        traj.append(optimize_z(model, spec, batch, cfg).loss)
    traj = torch.stack(traj)
    cfg.v_loss_threshold = max((float(v) + 1e-9 for v in traj.flatten()),
                               key=lambda t: len(set(_stopping_steps(traj, t))))
    expected = _stopping_steps(traj, cfg.v_loss_threshold)
    assert len(set(expected)) >= 3, "the test needs edits that stop at different steps"
    batched = optimize_z(model, spec, batch, cfg)
    assert batched.steps.tolist() == expected
    for i, r in enumerate(reqs):
        z, loss, steps = reference_z(model, tok, spec, r, PREFIXES, cfg)
        alone = optimize_z(model, spec, build_z_batch(tok, [r], PREFIXES), cfg)
        assert int(batched.steps[i]) == steps == int(alone.steps[0])
        assert (batched.z[i] - z).norm() / z.norm() <= 1e-3
        assert (alone.z[0] - z).norm() / z.norm() <= 1e-3
        assert abs(float(batched.loss[i]) - loss) <= 1e-6 * max(1.0, abs(loss))


def test_clamp_holds(make_model, tok):
    model = make_model("llama")
    cfg = MemitConfig(layers=[1], v_num_grad_steps=8, v_lr=5.0, clamp_norm_factor=0.1, v_weight_decay=0.0)
    res = optimize_z(model, get_spec(model), build_z_batch(tok, REQUESTS, PREFIXES), cfg)
    assert torch.all(res.delta_norm <= 0.1 * res.h_norm * (1 + 1e-5))
    assert torch.all(res.delta_norm >= 0.1 * res.h_norm * 0.99)  # a large lr drives δ onto the bound


def test_early_stop_with_high_threshold(make_model, tok):
    model = make_model("llama")
    cfg = MemitConfig(layers=[1], v_num_grad_steps=8, v_loss_threshold=1e9)
    res = optimize_z(model, get_spec(model), build_z_batch(tok, REQUESTS, PREFIXES), cfg)
    assert res.steps.tolist() == [0] * len(REQUESTS)
    assert torch.all(res.delta_norm == 0)


def test_z_makes_the_new_object_the_argmax(make_model, tok):
    """Writing z into h^L at the subject's last token makes the new object the top prediction.

    In a random tiny model, attention barely carries information between positions, so the prompts
    end with the subject (the edited position is the predicting one)."""
    model = make_model("llama")
    spec = get_spec(model)
    reqs = [EditRequest(str(i), s, "The answer to the question about {}", t)
            for i, (s, t) in enumerate([("France", "Rome"), ("Toyota", "Japan"), ("Einstein", "soccer")])]
    cfg = MemitConfig(layers=[1, 2], v_num_grad_steps=25, v_lr=1.0, clamp_norm_factor=50.0, kl_factor=0.0,
                      v_weight_decay=0.0)
    res = optimize_z(model, spec, build_z_batch(tok, reqs, [""]), cfg)
    pb = tokenize_with_subject(tok, [r.prompt for r in reqs], [r.subject for r in reqs])
    rows = torch.arange(len(reqs))
    top_before = model(input_ids=pb.input_ids, attention_mask=pb.attention_mask).logits[rows, pb.last].argmax(-1)
    with edit_output(model, spec.name("block", 2), lambda y: y.index_put((rows, pb.subject_last), res.z)):
        top = model(input_ids=pb.input_ids, attention_mask=pb.attention_mask).logits[rows, pb.last].argmax(-1)
    wanted = [target_ids(tok, r.target_new)[0] for r in reqs]
    assert top.tolist() == wanted
    assert top_before.tolist() != wanted


def test_row_adam_matches_torch_adam_and_freezes_other_rows():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(3, 5, generator=g)
    ref = p[1].clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=0.1)
    mine = p.clone().requires_grad_(True)
    adam = RowAdam(mine, lr=0.1)
    for _ in range(4):
        grad = torch.randn(3, 5, generator=g)
        ref.grad = grad[1].clone()
        opt.step()
        mine.grad = grad
        adam.step(torch.tensor([1]))
    torch.testing.assert_close(mine[1].detach(), ref.detach())
    torch.testing.assert_close(mine[0].detach(), p[0])
    torch.testing.assert_close(mine[2].detach(), p[2])


def test_loss_pieces_by_hand():
    log_probs = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]], [[0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]]]))
    nll = target_nll(log_probs, torch.tensor([[0, 1], [2, -100]]))
    torch.testing.assert_close(nll, torch.tensor([-(torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(0.8))) / 2,
                                                   -torch.log(torch.tensor(0.6))]))
    torch.testing.assert_close(mean_per_edit(torch.tensor([1.0, 3.0, 10.0]), torch.tensor([0, 0, 1]), 2), torch.tensor([2.0, 10.0]))
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    kl = essence_kl(p.log(), q.log())  # KL(q ‖ p)
    torch.testing.assert_close(kl, (q * (q / p).log()).sum(-1))
    d = clamp_rows(torch.tensor([[3.0, 4.0], [0.3, 0.4]]), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(d, torch.tensor([[0.6, 0.8], [0.3, 0.4]]))


def test_trainer_stage_store_and_resume(make_model, tok, tmp_path, monkeypatch):
    """A run killed after its first batch, restarted, equals an uninterrupted run."""
    import memit_pl.stages.zmodule as zm

    model = make_model("llama")
    cfg = MemitConfig(layers=[1, 2], v_num_grad_steps=4, z_batch_size=2, context_templates=[[3, 2]])
    tcfg = TrainerConfig(accelerator="cpu", enable_progress_bar=False)
    full = zm.compute_zs(model, tok, REQUESTS, cfg, tmp_path / "full", tcfg)
    assert sorted(full.case_ids) == sorted(r.case_id for r in REQUESTS)  # stored in the order optimised
    assert full.tensors["z"].shape == (4, 32)

    calls = {"n": 0}
    real = zm.optimize_z

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(zm, "optimize_z", dying)
    with pytest.raises(RuntimeError, match="killed"):
        zm.compute_zs(model, tok, REQUESTS, cfg, tmp_path / "resumed", tcfg)
    assert len(list((tmp_path / "resumed" / "parts").glob("*.safetensors"))) == 1
    monkeypatch.setattr(zm, "optimize_z", real)
    seen = []
    monkeypatch.setattr(zm, "optimize_z", lambda m, s, batch, c, on_step=None: seen.append(batch.case_ids) or real(m, s, batch, c, on_step))
    resumed = zm.compute_zs(model, tok, REQUESTS, cfg, tmp_path / "resumed", tcfg)
    assert seen == [["2", "3"]]
    assert sorted(resumed.case_ids) == sorted(full.case_ids)
    for c in full.case_ids:
        torch.testing.assert_close(resumed.z_for([c]), full.z_for([c]), atol=1e-6, rtol=1e-5)


def test_store_rejects_other_settings(make_model, tok, tmp_path):
    import memit_pl.stages.zmodule as zm

    model = make_model("llama")
    cfg = MemitConfig(layers=[1], v_num_grad_steps=2, context_templates=[[3, 1]])
    tcfg = TrainerConfig(accelerator="cpu", enable_progress_bar=False)
    zm.compute_zs(model, tok, REQUESTS[:1], cfg, tmp_path, tcfg)
    cfg2 = MemitConfig(layers=[1], v_num_grad_steps=3, context_templates=[[3, 1]])
    with pytest.raises(ValueError, match="another model, layer"):
        zm.compute_zs(model, tok, REQUESTS, cfg2, tmp_path, tcfg)


@pytest.mark.slow
def test_smollm2_batched_equals_reference_and_hits_targets(smollm2):
    """Three real edits: the batched optimiser follows the reference loop in float32, and writing z
    into h^L makes the new object the model's top prediction."""
    model, tok = smollm2
    spec = get_spec(model)
    reqs = [
        EditRequest("0", "Michael Jordan", "{} plays the sport of", "baseball"),
        EditRequest("1", "Eiffel Tower", "The {} is located in the city of", "Rome"),
        EditRequest("2", "Albert Einstein", "{} was a famous", "painter"),
    ]
    cfg = MemitConfig(layers=[3, 4, 5, 6, 7], v_num_grad_steps=20)
    prefixes = ["", "The first day of the week was a good one. ", "Because it was raining, I stayed home. "]
    res = optimize_z(model, spec, build_z_batch(tok, reqs, prefixes), cfg)
    for i, r in enumerate(reqs):
        z, loss, steps = reference_z(model, tok, spec, r, prefixes, cfg)
        assert (res.z[i] - z).norm() / z.norm() <= 1e-3
        assert int(res.steps[i]) == steps
    pb = tokenize_with_subject(tok, [r.prompt for r in reqs], [r.subject for r in reqs])
    rows = torch.arange(len(reqs))
    with torch.no_grad(), edit_output(model, spec.name("block", 7), lambda y: y.index_put((rows, pb.subject_last), res.z)):
        top = model(input_ids=pb.input_ids, attention_mask=pb.attention_mask).logits[rows, pb.last].argmax(-1)
    assert top.tolist() == [target_ids(tok, r.target_new)[0] for r in reqs]


def test_flat_target_nll_equals_padded():
    torch.manual_seed(0)
    lp = torch.log_softmax(torch.randn(3, 4, 11), -1)
    ids = torch.tensor([[1, 2, -100, -100], [3, -100, -100, -100], [4, 5, 6, 7]])
    real = ids != -100
    torch.testing.assert_close(target_nll_flat(lp[real], ids[real], real), target_nll(lp, ids))


def test_batches_are_ordered_by_live_length(tok):
    reqs = by_live_length(tok, REQUESTS + ENDING)
    lengths = [live_length(tok, r) for r in reqs]
    assert lengths == sorted(lengths) and sorted(r.case_id for r in reqs) == sorted(r.case_id for r in REQUESTS + ENDING)
    b = build_z_batch(tok, REQUESTS[:1], [""])
    row = b.rewrite_rows[0]
    assert live_length(tok, REQUESTS[0]) == int(b.attention_mask[row].sum() - b.lookup[row])


def test_store_key_depends_on_the_compute_precision():
    from memit_pl.stages.zstore import store_key

    cfg = MemitConfig(layers=[1])
    assert store_key("f", cfg, [""]) == store_key("f", cfg, [""], None)
    assert store_key("f", cfg, [""], "bfloat16") != store_key("f", cfg, [""])


def test_compiled_blocks_give_the_same_z(make_model, tok, monkeypatch):
    """z_compile runs each re-run block through torch.compile; where that fails, eager (same z)."""
    import memit_pl.modeling.tail as tail_mod

    model = make_model("llama")
    spec = get_spec(model)
    batch = build_z_batch(tok, REQUESTS[:2], PREFIXES[:2])
    cfg = MemitConfig(layers=[1], v_num_grad_steps=3, v_lr=0.05)
    eager = optimize_z(model, spec, batch, cfg)
    calls = []

    def broken(block, **kw):  # a platform whose compiler fails at the first call
        def fn(*a, **k):
            calls.append(block)
            raise RuntimeError("no C++ compiler")
        return fn

    monkeypatch.setattr(torch, "compile", broken)
    tail_mod._COMPILED.clear()
    cfg.z_compile = True
    fallen_back = optimize_z(model, spec, batch, cfg)
    assert len(calls) == spec.n_layers(model) - 2  # each block above L tried once, then eager for good
    torch.testing.assert_close(fallen_back.z, eager.z, rtol=0, atol=0)
    tail_mod._COMPILED.clear()


@pytest.mark.slow
def test_torch_compile_of_the_tail_matches_eager(make_model, tok):
    import memit_pl.modeling.tail as tail_mod

    model = make_model("llama")
    spec = get_spec(model)
    batch = build_z_batch(tok, REQUESTS[:2], PREFIXES[:2])
    cfg = MemitConfig(layers=[1], v_num_grad_steps=3, v_lr=0.05)
    eager = optimize_z(model, spec, batch, cfg)
    tail_mod._COMPILED.clear()
    cfg.z_compile = True
    comp = optimize_z(model, spec, batch, cfg)
    assert all(fn is not block for block, fn in tail_mod._COMPILED.items())  # it did compile
    torch.testing.assert_close(comp.z, eager.z, rtol=1e-4, atol=1e-4)
    tail_mod._COMPILED.clear()
