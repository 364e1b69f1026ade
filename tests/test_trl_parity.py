"""minidpo's losses and one DPO step against TRL 1.16's own code, on the same numbers.

The losses: random float64 log-probabilities (policy ones requiring grad) go through TRL's loss code and
through `minidpo.loss.dpo_loss`: DPOTrainer's `_compute_loss` (its per-token log-probs come from a stand-in
model returning our tensor), CPOTrainer's `cpo_loss` and ORPOTrainer's `odds_ratio_loss`, and, for the NLL
terms, the CPO and ORPO trainers' `get_batch_loss_metrics` on random float64 logits. The trainers are real
ones, built once on a tiny in-memory Mistral. Loss, rewards, metrics and gradients agree to 1e-6 relative.

The step: the same tiny random Mistral with the same LoRA weights, the same 4 pairs, one optimizer step in
`trl.DPOTrainer` (+ PEFT) and in minidpo (sigmoid, beta 0.1, fp32): log-probs, loss, rewards, LoRA
gradients and the updated weights agree to 1e-5.

Differences kept (each asserted below):
- TRL's DPOTrainer ignores `label_smoothing` with "sigmoid" (since its 1.x rewrite); minidpo keeps cDPO,
  the formula TRL's CPOTrainer still uses: checked against that.
- IPO and sigmoid_norm: TRL logs rewards from the summed log-probs, minidpo from the per-token averages the
  loss is defined on (the loss and gradients are the same).
- ORPO's NLL: TRL's ORPOTrainer takes it over prompt and reply tokens; minidpo over the chosen reply only,
  as ORPO's paper (L_SFT of y_w given x), as CPO and RPO in both libraries, and as TRL's own ORPO log-odds.
- Tokens: on conversational rows TRL also trains on the chat template's newline after the end-of-turn
  token; minidpo's reply ends at the end-of-turn token (what the model generates). The step feeds TRL the
  rendered prompt as text, so both score exactly the same tokens.
"""
import importlib
import json
import math
from types import SimpleNamespace

import datasets
import peft
import pytest
import torch
import trl
from transformers import PreTrainedTokenizerFast, TrainerCallback
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from conftest import CHATML_TEMPLATE, make_hf_mistral, write_tokenizer_folder
from minidpo.lora import lora_layers
from minidpo.loss import batch_nll, dpo_loss, needs_average
from minidpo.tokenizer import load_tokenizer

T = importlib.import_module("minidpo.train")  # the module (the package exports a function `train`)

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")]
TINY = dict(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROWS = [{"prompt": "What is 12 plus 30?", "chosen": "The answer is 42.", "rejected": "pear, apple, fig."},
        {"prompt": "Sort these words: pear, apple, fig.", "chosen": "apple, fig, pear.", "rejected": "six."},
        {"prompt": "Count the letters in banana.", "chosen": "six letters.", "rejected": "The quick brown fox."},
        {"prompt": "def add(a, b):", "chosen": "return a + b", "rejected": "The lazy dog jumps over it."}]


def close(ours, theirs, msg=""):
    """<= 1e-6 relative (to the tensor's largest magnitude)."""
    ours, theirs = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(theirs, dtype=torch.float64)
    scale = max(theirs.abs().max().item(), 1e-30)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6 * scale, msg=msg)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl")
    make_hf_mistral(root / "model", **TINY)
    write_tokenizer_folder(root / "model")
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return root


def hf_tokenizer(world):
    tok = PreTrainedTokenizerFast(tokenizer_file=str(world / "model" / "tokenizer.json"), bos_token="<s>",
                                  eos_token="<|im_end|>", unk_token="<unk>", pad_token="</s>")
    tok.chat_template = CHATML_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def trainers(world, tmp_path_factory):
    """Real TRL trainers on a tiny in-memory model; only their loss code is called."""
    data = datasets.Dataset.from_list(ROWS)
    out = tmp_path_factory.mktemp("trl-out")
    common = dict(output_dir=str(out), report_to="none", use_cpu=True, save_strategy="no")
    tok = hf_tokenizer(world)
    built = {}
    for name, trainer, config in (("dpo", trl.DPOTrainer, trl.DPOConfig), ("cpo", CPOTrainer, CPOConfig),
                                  ("orpo", ORPOTrainer, ORPOConfig)):
        model = make_hf_mistral(None, **TINY)
        extra = {"ref_model": make_hf_mistral(None, **TINY)} if name == "dpo" else {}
        built[name] = trainer(model=model, args=config(**common), train_dataset=data, processing_class=tok, **extra)
    return built


# ---------------------------------------------------------------------------------------------------
# DPOTrainer's loss types.

def dpo_inputs(b=6, t=14, seed=0):
    """Per-token policy log-probs [2b, t-1] (leaf, float64, with grad; zero off the replies) and the
    DPOTrainer batch around them: completion mask, precomputed reference log-probs."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(2, 6, (2 * b,), generator=g)
    reply = torch.randint(1, t - 6, (2 * b,), generator=g)
    pos = torch.arange(t)
    completion = ((pos >= prompt[:, None]) & (pos < (prompt + reply)[:, None])).long()
    attention = (pos < (prompt + reply)[:, None]).long()
    shift = completion[:, 1:].double()
    per_token = (-torch.rand(2 * b, t - 1, generator=g, dtype=torch.float64) * 2 * shift).requires_grad_()
    ref_sums = (per_token.detach() + torch.randn(2 * b, t - 1, generator=g, dtype=torch.float64) * 0.3 * shift).sum(1)
    inputs = {"input_ids": torch.randint(0, 400, (2 * b, t), generator=g), "attention_mask": attention,
              "completion_mask": completion, "ref_chosen_logps": ref_sums[:b], "ref_rejected_logps": ref_sums[b:]}
    return per_token, inputs


class StandIn(torch.nn.Module):
    """What DPOTrainer's fused-head forward returns, with our per-token log-probs."""

    def __init__(self, per_token):
        super().__init__()
        self.per_token = per_token

    def forward(self, **kwargs):
        zeros = torch.zeros_like(self.per_token.detach())
        return SimpleNamespace(log_probs=self.per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def configure(monkeypatch, trainer, **values):
    for name, value in values.items():
        monkeypatch.setattr(trainer, name, value, raising=False)


def trl_dpo(trainer, monkeypatch, per_token, inputs, loss_types, weights, beta, eps):
    configure(monkeypatch, trainer, loss_types=loss_types, loss_weights=weights, beta=beta, label_smoothing=eps,
              precompute_ref_logps=True)
    trainer._metrics["train"].clear()
    trainer.model.train()
    loss = trainer._compute_loss(StandIn(per_token), inputs, False)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss, logged


def ours_dpo(per_token, inputs, loss_type, beta, eps, rpo_alpha=0.0):
    """minidpo's side from the same tensors: sums, or per-token averages where the loss takes them."""
    b = inputs["ref_chosen_logps"].shape[0]
    shift = inputs["completion_mask"][:, 1:]
    counts = shift.sum(1)
    logps = (per_token * shift).sum(1)
    ref = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
    if needs_average(loss_type):
        logps, ref = logps / counts, ref / counts
    nll = batch_nll(logps[:b], counts[:b], average=needs_average(loss_type)) if rpo_alpha else None
    return dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta=beta, loss_type=loss_type,
                    label_smoothing=eps, rpo_alpha=rpo_alpha, chosen_nll=nll), counts


DPO_CASES = ([("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("sigmoid_norm", 0.0), ("nca_pair", 0.0),
              ("bco_pair", 0.0), ("sppo_hard", 0.0), ("apo_zero", 0.0), ("apo_down", 0.0)]
             + [("robust", e) for e in (0.0, 0.1, 0.3)] + [("exo_pair", e) for e in (1e-3, 0.2)]
             + [(t, e) for t in ("aot", "aot_unpaired") for e in (0.0, 0.2)])


@pytest.mark.parametrize("beta", [0.1, 0.7])
@pytest.mark.parametrize("loss_type,eps", DPO_CASES)
def test_dpo_trainer_loss_types(trainers, monkeypatch, loss_type, eps, beta):
    per_token, inputs = dpo_inputs(seed=DPO_CASES.index((loss_type, eps)) + round(100 * beta))
    theirs, logged = trl_dpo(trainers["dpo"], monkeypatch, per_token, inputs, [loss_type], [1.0], beta, eps)
    theirs.backward()
    their_grad, per_token.grad = per_token.grad, None
    out, counts = ours_dpo(per_token, inputs, loss_type, beta, eps)
    out.loss.backward()
    close(out.loss, theirs, "loss")
    scored = inputs["completion_mask"][:, 1:].bool()  # elsewhere the log-probs are zeros, not values
    close(per_token.grad[scored], their_grad[scored], "gradient")
    chosen, rejected = out.chosen_rewards, out.rejected_rewards
    if needs_average(loss_type):  # TRL logs these two losses' rewards from the sums
        b = chosen.shape[0]
        chosen, rejected = chosen * counts[:b], rejected * counts[b:]
    close(chosen.mean(), logged["rewards/chosen"], "rewards/chosen")
    close(rejected.mean(), logged["rewards/rejected"], "rewards/rejected")
    close((chosen - rejected).mean(), logged["rewards/margins"], "rewards/margins")
    assert (chosen > rejected).double().mean().item() == pytest.approx(logged["rewards/accuracies"])


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "robust"])
def test_rpo_alpha_is_trls_sft_term(trainers, monkeypatch, loss_type):
    # TRL 1.16 spells RPO loss_type=[X, "sft"], loss_weights=[1, alpha]: "sft" is the mean NLL over
    # every chosen token of the batch (not a mean of per-sequence means)
    per_token, inputs = dpo_inputs(seed=11)
    eps = 0.1 if loss_type == "robust" else 0.0
    theirs, _ = trl_dpo(trainers["dpo"], monkeypatch, per_token, inputs, [loss_type, "sft"], [1.0, 0.4], 0.2, eps)
    theirs.backward()
    their_grad, per_token.grad = per_token.grad, None
    out, counts = ours_dpo(per_token, inputs, loss_type, 0.2, eps, rpo_alpha=0.4)
    out.loss.backward()
    close(out.loss, theirs, "loss")
    scored = inputs["completion_mask"][:, 1:].bool()
    close(per_token.grad[scored], their_grad[scored], "gradient")
    b = counts.shape[0] // 2
    mask = inputs["completion_mask"][:b, 1:].bool()
    close(out.metrics["nll_loss"].mean(), -per_token.detach()[:b][mask].mean(), "nll_loss")


def test_sigmoid_label_smoothing_is_cdpo_as_trls_cpo_trainer(trainers, monkeypatch):
    # TRL's DPOTrainer drops label_smoothing for "sigmoid"; its CPOTrainer keeps the cDPO form on
    # whatever difference it is given: given the log-ratios, it is minidpo's smoothed sigmoid.
    cpo = trainers["cpo"]
    for eps, beta in ((0.1, 0.1), (0.3, 0.5), (0.5, 2.0)):
        pc, pr, rc, rr = random_logps(9, seed=int(eps * 10))
        configure(monkeypatch, cpo, loss_type="sigmoid", beta=beta, label_smoothing=eps, alpha=0.0)
        their_losses, _, _ = cpo.cpo_loss(pc - rc, pr - rr)
        their_grad = torch.autograd.grad(their_losses.mean(), (pc, pr))
        out = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
        close(out.losses, their_losses)
        for ours, theirs in zip(torch.autograd.grad(out.loss, (pc, pr)), their_grad):
            close(ours, theirs)


# ---------------------------------------------------------------------------------------------------
# CPOTrainer (simpo, cpo) and ORPOTrainer (orpo).

def random_logps(b, seed, average=False):
    """Four [B] float64 leaves like sequence log-probs (policy ones require grad)."""
    g = torch.Generator().manual_seed(seed)
    scale = 2.0 if average else 40.0
    ref = -torch.rand(2, b, generator=g, dtype=torch.float64) * scale - 0.05
    policy = (ref + torch.randn(2, b, generator=g, dtype=torch.float64) * scale / 20).clamp(max=-1e-3)
    return policy[0].requires_grad_(), policy[1].requires_grad_(), ref[0], ref[1]


@pytest.mark.parametrize("loss_type,eps,gamma", [("cpo", 0.0, 0.5), ("cpo", 0.2, 0.5), ("simpo", 0.0, 0.5),
                                                 ("simpo", 0.1, 1.4), ("simpo", 0.0, 0.0)])
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_cpo_trainer_losses(trainers, monkeypatch, loss_type, eps, gamma, beta):
    cpo = trainers["cpo"]
    pc, pr, _, _ = random_logps(10, seed=3, average=loss_type == "simpo")
    configure(monkeypatch, cpo, loss_type="sigmoid" if loss_type == "cpo" else "simpo", beta=beta,
              label_smoothing=eps, simpo_gamma=gamma, alpha=0.0)
    losses, chosen_rewards, rejected_rewards = cpo.cpo_loss(pc, pr)
    their_grad = torch.autograd.grad(losses.mean(), (pc, pr))
    out = dpo_loss(pc, pr, None, None, loss_type=loss_type, beta=beta, label_smoothing=eps, cpo_alpha=0.0,
                   **({"simpo_gamma": gamma} if loss_type == "simpo" else {}))
    close(out.losses, losses)
    close(out.chosen_rewards, chosen_rewards)
    close(out.rejected_rewards, rejected_rewards)
    for ours, theirs in zip(torch.autograd.grad(out.loss, (pc, pr)), their_grad):
        close(ours, theirs)


@pytest.mark.parametrize("beta", [0.1, 0.25, 1.0])
def test_orpo_trainer_odds_ratio_loss(trainers, monkeypatch, beta):
    orpo = trainers["orpo"]
    monkeypatch.setattr(orpo, "beta", beta)
    pc, pr, _, _ = random_logps(12, seed=5, average=True)
    pc.data[:2] = torch.tensor([-1e-7, -30.0], dtype=torch.float64)  # both branches of log(1 - e^x)
    losses, chosen_rewards, rejected_rewards, ratio, log_odds = orpo.odds_ratio_loss(pc, pr)
    their_grad = torch.autograd.grad(-losses.mean(), (pc, pr))  # TRL: loss = nll - mean(losses)
    zero_nll = torch.zeros(12, dtype=torch.float64)
    out = dpo_loss(pc, pr, None, None, loss_type="orpo", beta=beta, chosen_nll=zero_nll)
    close(out.losses, -losses)
    close(out.chosen_rewards, chosen_rewards)
    close(out.rejected_rewards, rejected_rewards)
    close(out.metrics["log_odds_ratio"].mean(), ratio)
    close(out.metrics["log_odds_chosen"].mean(), log_odds)
    for ours, theirs in zip(torch.autograd.grad(out.loss, (pc, pr)), their_grad):
        close(ours, theirs)


def logits_batch(b=5, t=12, v=16, seed=0):
    """Random float64 logits [2b, t, v] (leaf) and a CPO/ORPO-trainer batch of the same rows."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(2, 5, (2 * b,), generator=g)
    reply = torch.randint(1, t - 5, (2 * b,), generator=g)
    pos = torch.arange(t)
    ids = torch.randint(0, v, (2 * b, t), generator=g)
    reply_mask = (pos >= prompt[:, None]) & (pos < (prompt + reply)[:, None])
    labels = torch.where(reply_mask, ids, -100)
    attention = (pos < (prompt + reply)[:, None]).long()
    logits = (torch.randn(2 * b, t, v, generator=g, dtype=torch.float64) * 2).requires_grad_()
    batch = {f"{side}_{key}": value[rows] for side, rows in (("chosen", slice(0, b)), ("rejected", slice(b, None)))
             for key, value in (("input_ids", ids), ("attention_mask", attention), ("labels", labels))}
    return logits, batch, labels


def ours_from_logits(logits, labels, loss_type, **kwargs):
    """minidpo's loss from the logits: per-token log-probs, sums or averages, the NLL per chosen token."""
    b = logits.shape[0] // 2
    target = labels[:, 1:]
    scored = target != -100
    token = logits[:, :-1].log_softmax(-1).gather(-1, target.clamp(min=0)[..., None])[..., 0] * scored
    counts = scored.sum(1)
    average = needs_average(loss_type)
    logps = token.sum(1) / counts if average else token.sum(1)
    nll = batch_nll(logps[:b], counts[:b], average=average)
    return dpo_loss(logps[:b], logps[b:], None, None, loss_type=loss_type, chosen_nll=nll, **kwargs)


class LogitsModel(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, *args, **kwargs):
        return SimpleNamespace(logits=self.logits)


@pytest.mark.parametrize("loss_type,cpo_alpha", [("cpo", 1.0), ("cpo", 0.3), ("simpo", 0.5)])
def test_cpo_trainer_whole_loss_with_nll(trainers, monkeypatch, loss_type, cpo_alpha):
    cpo = trainers["cpo"]
    logits, batch, labels = logits_batch(seed=7)
    configure(monkeypatch, cpo, loss_type="sigmoid" if loss_type == "cpo" else "simpo", beta=0.3,
              label_smoothing=0.0, simpo_gamma=0.5, alpha=0.0, cpo_alpha=cpo_alpha)
    theirs, metrics = cpo.get_batch_loss_metrics(LogitsModel(logits), batch)
    their_grad = torch.autograd.grad(theirs, logits)[0]
    out = ours_from_logits(logits, labels, loss_type, beta=0.3, cpo_alpha=cpo_alpha)
    close(out.loss, theirs)
    close(torch.autograd.grad(out.loss, logits)[0], their_grad)
    close(out.metrics["nll_loss"].mean(), metrics["nll_loss"])
    close(out.chosen_rewards.mean(), metrics["rewards/chosen"])
    close(out.rejected_rewards.mean(), metrics["rewards/rejected"])


def test_orpo_trainer_whole_loss_and_its_prompt_nll(trainers, monkeypatch):
    orpo = trainers["orpo"]
    monkeypatch.setattr(orpo, "beta", 0.2)
    logits, batch, labels = logits_batch(seed=9)
    # TRL takes ORPO's NLL over every attended token: marking only the replies as attended (the stand-in
    # model ignores the mask) makes it minidpo's reply-only NLL, and the whole loss then agrees.
    reply_only = {**batch, "chosen_attention_mask": (batch["chosen_labels"] != -100).long()}
    theirs, metrics = orpo.get_batch_loss_metrics(LogitsModel(logits), reply_only)
    their_grad = torch.autograd.grad(theirs, logits)[0]
    out = ours_from_logits(logits, labels, "orpo", beta=0.2)
    close(out.loss, theirs)
    close(torch.autograd.grad(out.loss, logits)[0], their_grad)
    for key in ("nll_loss", "log_odds_ratio", "log_odds_chosen"):
        close(out.metrics[key].mean(), metrics[key], key)
    close(out.chosen_rewards.mean(), metrics["rewards/chosen"])
    # TRL's own batch: its NLL covers the prompt tokens too, so it differs from ours by exactly them.
    _, with_prompt = orpo.get_batch_loss_metrics(LogitsModel(logits), batch)
    b = logits.shape[0] // 2
    mask = batch["chosen_attention_mask"][:, 1:].bool()
    token_nll = -logits[:b, :-1].log_softmax(-1).gather(-1, batch["chosen_input_ids"][:, 1:, None])[..., 0]
    close(with_prompt["nll_loss"], token_nll.detach()[mask].mean())
    assert abs(with_prompt["nll_loss"] - metrics["nll_loss"]) > 1e-3


# ---------------------------------------------------------------------------------------------------
# One whole step against DPOTrainer.

def test_one_dpo_step_equals_trl(world, tmp_path):
    config = T.TrainConfig(model=str(world / "model"), data=[str(world / "pairs.jsonl")], out=str(tmp_path / "m"),
                           lora_r=4, lora_alpha=8.0, lora_dropout=0.0, lora_targets=TARGETS, beta=0.1, lr=1e-3,
                           schedule="constant", warmup_ratio=0.0, batch_size=4, max_steps=1, max_length=64,
                           max_grad_norm=0.0, dtype="float32", device="cpu")
    tokenizer = load_tokenizer(world / "model")
    pairs, _ = T.prepare_data(config, tokenizer)
    ours, _ = T.build_models(config, world / "model", torch.device("cpu"), torch.float32)

    tok = hf_tokenizer(world)
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                       tokenize=False) for r in ROWS]
    text = [{"prompt": p, "chosen": r["chosen"] + "<|im_end|>", "rejected": r["rejected"] + "<|im_end|>"}
            for p, r in zip(prompts, ROWS)]
    args = trl.DPOConfig(output_dir=str(tmp_path / "t"), per_device_train_batch_size=4, max_steps=1,
                         learning_rate=1e-3, lr_scheduler_type="constant", beta=0.1, loss_type="sigmoid",
                         max_grad_norm=0.0, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
                         disable_tqdm=True, seed=0, bf16=False)
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    grads = {}

    class Grads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad})

    trainer = trl.DPOTrainer(model=make_hf_mistral(None, **TINY), args=args, train_dataset=datasets.Dataset.from_list(text),
                             processing_class=tok, peft_config=lora, callbacks=[Grads()])
    # The same token ids on both sides (see the module docstring for the conversational rows).
    theirs_ids = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset]
    assert sorted(theirs_ids) == sorted((p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs)
    chat = trl.DPOTrainer(model=make_hf_mistral(None, **TINY), args=args, processing_class=tok, peft_config=lora,
                          train_dataset=datasets.Dataset.from_list(
                              [{"prompt": [{"role": "user", "content": r["prompt"]}],
                                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in ROWS]))
    newline = tok.encode("\n", add_special_tokens=False)
    assert sorted(r["chosen_ids"] for r in chat.train_dataset) == sorted(p.chosen_ids + newline for p in pairs)

    # The same LoRA weights: PEFT's A, and B made non-zero (B = 0 would leave A without gradient).
    peft_model = trainer.model.base_model.model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            theirs = peft_model.get_submodule(name)
            theirs.lora_B["default"].weight.copy_(torch.randn(theirs.lora_B["default"].weight.shape, generator=g) * 0.1)
            layer.lora_A.weight.copy_(theirs.lora_A["default"].weight)
            layer.lora_B.weight.copy_(theirs.lora_B["default"].weight)

    # TRL's per-sequence log-probs, keyed by the row's tokens: the first forward of the step is the policy's.
    rows, losses, compute_loss = [], [], trainer.compute_loss
    hook = trainer.model.register_forward_hook(
        lambda module, args, kwargs, output: rows.append((kwargs["input_ids"], output.log_probs.detach())),
        with_kwargs=True)
    trainer.compute_loss = lambda *a, **k: losses.append(compute_loss(*a, **k)) or losses[-1]
    trainer.train()
    hook.remove()
    logged = {**next(r for r in trainer.state.log_history if "rewards/chosen" in r), "loss": losses[0].item()}
    input_ids, per_token = rows[0]
    their_logps = {tuple(ids[:len(ids) - (ids == tok.pad_token_id).long().flip(0).cumprod(0).sum()].tolist()): v
                   for ids, v in zip(input_ids, per_token.sum(1))}

    batches = T.step_batches(pairs, list(range(4)), config, tokenizer.pad_id, torch.device("cpu"))
    with torch.no_grad():
        _, logps = T.dpo_forward(ours, None, batches[0], config)
    optimizer, scheduler = T.build_optimizer(ours, config, 1)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    step = T.dpo_step(ours, batches, config)
    our_grads = {n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad}
    values = T.optimizer_step(params, optimizer, scheduler, step, config, 1)

    b = len(pairs)
    for i, p in enumerate(pairs):
        for j, reply in ((i, p.chosen_ids), (b + i, p.rejected_ids)):
            torch.testing.assert_close(logps[j], their_logps[tuple(p.prompt_ids + reply)], rtol=1e-5, atol=1e-5)
    for key, theirs in (("loss", "loss"), ("rewards/chosen", "rewards/chosen"), ("rewards/margin", "rewards/margins"),
                        ("logps/chosen", "logps/chosen"), ("logps/rejected", "logps/rejected")):
        ours_value = values[key] if key != "rewards/margin" else values["rewards/chosen"] - values["rewards/rejected"]
        assert ours_value == pytest.approx(logged[theirs], rel=1e-5, abs=1e-6), key
    assert values["loss"] != pytest.approx(math.log(2), abs=1e-3)  # the adapters do change the policy
    assert len(our_grads) == len(grads) == 2 * 7 * 2
    for name, layer in lora_layers(ours).items():
        for part in ("lora_A", "lora_B"):
            theirs = grads[f"base_model.model.{name}.{part}.default.weight"]
            mine = our_grads[f"{name}.{part}.weight"]
            assert theirs.abs().max() > 0
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item(), msg=name)
            after = getattr(peft_model.get_submodule(name), part)["default"].weight
            torch.testing.assert_close(getattr(layer, part).weight, after, rtol=1e-5, atol=1e-7)
