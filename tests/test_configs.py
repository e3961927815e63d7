"""Every experiment x ablation composes and instantiates; each ablation changes only its own keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from resume.utils.config import CONFIG_DIR

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
ABLATIONS = sorted(p.stem for p in (CONFIG_DIR / "ablation").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml"))
RETRIEVERS = sorted(p.stem for p in (CONFIG_DIR / "retriever").glob("*.yaml"))
LOGGERS = sorted(p.stem for p in (CONFIG_DIR / "logger").glob("*.yaml"))


def _flat(cfg) -> dict[str, object]:
    out: dict[str, object] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return out


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("ablation", ABLATIONS)
def test_every_experiment_and_ablation_composes(compose_in_tmp, experiment, ablation):
    extra = ["transfer.run=/some/finished/run"] if experiment == "transfer" else []  # its one required key
    cfg = compose_in_tmp([f"experiment={experiment}", f"ablation={ablation}", "debug=smoke", *extra])
    OmegaConf.resolve(cfg)  # every interpolation resolves
    named = {"transfer": "iterative"}  # transfer names its row after what it transfers
    assert cfg.experiment_name == named.get(experiment, experiment.removeprefix("paper_"))
    assert cfg.ablation_name == ablation


@pytest.mark.parametrize("ablation", [a for a in ABLATIONS if a != "none"])
def test_ablation_changes_only_its_own_keys(compose_in_tmp, ablation):
    base = _flat(
        compose_in_tmp(["experiment=iterative" if "iterative" in EXPERIMENTS else "experiment=baseline"])
    )
    abl_cfg = compose_in_tmp(
        [
            "experiment=iterative" if "iterative" in EXPERIMENTS else "experiment=baseline",
            f"ablation={ablation}",
        ]
    )
    diff = {k for k in set(base) | set(_flat(abl_cfg)) if base.get(k) != _flat(abl_cfg).get(k)}
    text = (CONFIG_DIR / "ablation" / f"{ablation}.yaml").read_text()
    own = {k for k in diff if k.split(".")[-1] in text}
    assert diff - {"ablation_name"} == own - {"ablation_name"}, (
        f"{ablation} changes keys it does not name: {diff - own}"
    )
    assert "ablation_name" in diff


@pytest.mark.parametrize("dataset", DATASETS)
def test_data_configs_compose(compose_in_tmp, dataset):
    if dataset == "beir":  # any folder: named after it, splits found from its qrels/ when loaded
        cfg = compose_in_tmp(["data=beir", "data.path=/somewhere/my-corpus"])
        assert cfg.data.name == "my-corpus" and cfg.data.splits is None
        assert cfg.run_name.startswith("my-corpus-")
    else:
        cfg = compose_in_tmp([f"data={dataset}"])
        assert cfg.data.name == dataset
        assert cfg.data.eval_split in cfg.data.splits or cfg.data.dev_from_train
    assert cfg.data._target_ == "resume.data.load_dataset"


def test_offline_data_configs_point_at_shared_copies(compose_in_tmp):
    for name in ["scifact", "msmarco_dl19", "nfcorpus"]:
        cfg = compose_in_tmp([f"data={name}"])
        assert Path(cfg.data.path).parts[-3:] == ("shared", "data", name) or "RESUME_SHARED_DATA" in str(
            cfg.data.path
        )


@pytest.mark.parametrize("logger", LOGGERS)
def test_loggers_instantiate_offline(compose_in_tmp, logger, tmp_path):
    from resume.utils.lightning import build_loggers, close_loggers

    cfg = compose_in_tmp([f"logger={logger}"])
    cfg.paths.output_dir = str(tmp_path / "out")
    loggers = build_loggers(cfg.get("logger"))
    expected = {"none": 0, "csv": 1, "wandb": 1, "csv_wandb": 2}[logger]
    assert len(loggers) == expected
    for lg in loggers:
        lg.log_metrics({"eval/test/ndcg@10": 0.5}, step=0)
    close_loggers(loggers, "success")


def test_tiny_retriever_instantiates(compose_in_tmp):
    cfg = compose_in_tmp(["retriever=tiny"])
    r = instantiate(cfg.retriever)
    e = r.encode_queries(["hello world", "zesudo"])
    assert e.shape == (2, 32)


@pytest.mark.parametrize("retriever", RETRIEVERS)
def test_retriever_configs_compose(compose_in_tmp, retriever):
    cfg = compose_in_tmp([f"retriever={retriever}"])
    assert cfg.retriever.pooling in ("mean", "cls", "last")


def test_notebooks_have_outputs_stripped():
    import json

    for nb in (CONFIG_DIR.parent / "notebooks").glob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        assert all(
            not c.get("outputs") and c.get("execution_count") is None
            for c in cells
            if c["cell_type"] == "code"
        ), nb


@pytest.mark.real
@pytest.mark.parametrize("ablation", ABLATIONS)
def test_default_budget_builds_its_data_and_reward(compose_in_tmp, ablation):
    """The embedded default's budget is consistent under every ablation: its SciFact subset loads
    and its reward (negatives pool, rewardable documents) validates. Caught two budget errors, and
    a budget overriding no_negatives' n_negatives=0, before a long run."""
    cfg = compose_in_tmp(["retriever=tiny", f"ablation={ablation}"])  # the default run, stand-in retriever
    data = instantiate(cfg.data)
    assert len(data.corpus) == cfg.data.max_docs
    train = data.split("train")
    reward = instantiate(cfg.reward)(
        retriever=instantiate(cfg.retriever),
        doc_texts={d: doc.full_text for d, doc in data.corpus.items()},
        queries=train.queries,
        qrels=train.qrels,
    )
    assert len(reward.rewardable_doc_ids()) >= cfg.grpo.config.prompts_per_step


BUDGETS = sorted(p.stem for p in (CONFIG_DIR / "budget").glob("*.yaml"))


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("ablation", [a for a in ABLATIONS if a != "none"])
def test_no_budget_overrides_an_ablation(compose_in_tmp, budget, ablation):
    """Every key an ablation file sets keeps the ablation's value whatever the budget."""
    own = _flat(OmegaConf.load(CONFIG_DIR / "ablation" / f"{ablation}.yaml"))
    cfg = _flat(compose_in_tmp([f"ablation={ablation}", f"budget={budget}"]))
    assert {k: cfg[k] for k in own} == own


# A budget's engine settings (`summarizer.backend.<engine>.<key>`) reach that engine and no other, so every
# budget builds with every backend (cpu_study + summarizer/backend=hf raised a TypeError before).
TINY_LLM = (
    "+summarizer.config={model_type: llama, hidden_size: 64, num_hidden_layers: 1, num_attention_heads: 2,"
    " num_key_value_heads: 2, intermediate_size: 64, max_position_embeddings: 2048}"
)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("backend", ["hf", "vllm", "auto"])
def test_every_budget_builds_with_every_generation_backend(compose_in_tmp, budget, backend):
    if backend != "hf":
        pytest.importorskip("vllm")
    cfg = compose_in_tmp(
        [f"budget={budget}", f"summarizer/backend={backend}", "summarizer.model=null", TINY_LLM]
    )
    built = instantiate(cfg.summarizer).backend
    engine = "hf" if type(built).__name__ == "HFBackend" else "vllm"
    assert engine == ("hf" if backend == "hf" else "vllm")
    node = cfg.summarizer.backend
    own = node.get(engine, {}) if backend != "auto" else node[engine]
    settings = {k: v for k, v in own.items() if not k.startswith("_") and k not in ("hf", "vllm")}
    for key, value in settings.items():
        attr = {"dtype": "dtype_setting"}.get(key, key)
        if hasattr(built, attr) and key not in ("engine_kwargs", "cache_dir"):
            assert getattr(built, attr) == value, (budget, backend, key)
    if engine == "vllm":
        assert built.shape is not None  # the KV cache is planned from the summarizer's prompts


PAPER = [e for e in EXPERIMENTS if e.startswith("paper_")]


@pytest.mark.parametrize("experiment", PAPER)
def test_paper_presets_hold_the_papers_settings(compose_in_tmp, experiment):
    cfg = compose_in_tmp([f"experiment={experiment}"])
    assert cfg.experiment_name == experiment.removeprefix("paper_")
    assert (cfg.data.name, cfg.data.eval_split, cfg.data.max_docs, cfg.data.max_queries) == (
        "msmarco",
        "dev",
        None,
        None,
    )
    assert (cfg.summarizer.model, cfg.retriever.model) == (
        "Qwen/Qwen3-4B-Thinking-2507",
        "facebook/contriever",
    )
    g = cfg.grpo
    assert (g.config.steps, g.config.prompts_per_step, g.optimizer.lr) == (200, 128, 3e-7)
    assert cfg.adaptation.lr == 1e-5 and cfg.budget.name == "full" and cfg.run_name.endswith("-paper")
    base = _flat(compose_in_tmp([f"experiment={experiment.removeprefix('paper_')}", "data=msmarco"]))
    flat = _flat(cfg)
    assert {k: flat[k] for k in ("loop.max_iterations", "corpus_view")} == {
        k: base[k] for k in ("loop.max_iterations", "corpus_view")
    }


def test_slurm_launcher_preset_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[cluster]'")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.max_num_timeout) == (1, 1, 3)


@pytest.mark.parametrize("control", ["adapted_baseline", "adapted_fixed_summary", "adapted_lead"])
def test_control_rows_share_the_iterative_rows_recipe(compose_in_tmp, control):
    """A control row differs from `iterative` only in the keys its file names (and the Table 1
    evaluation points, which only `iterative` lists): adaptation, retriever, reward and budget are
    the full model's, so the comparison isolates what the control leaves out."""
    full = _flat(compose_in_tmp(["experiment=iterative"]))
    mine = _flat(compose_in_tmp([f"experiment={control}"]))
    diff = {k for k in set(full) | set(mine) if full.get(k) != mine.get(k)}
    diff = {k for k in diff if not k.startswith("loop.eval_points")}
    text = (CONFIG_DIR / "experiment" / f"{control}.yaml").read_text()
    assert diff, "a control row must change something"
    assert all(k.split(".")[-1] in text for k in diff), f"{control} changes keys it does not name: {diff}"
    assert not [k for k in diff if k.split(".")[0] in {"adaptation", "retriever", "reward", "budget", "data"}]


def test_the_lead_control_is_the_baseline_over_shorter_texts(compose_in_tmp):
    """`lead` differs from `baseline` only in the keys its file names: same retriever, data and budget,
    no training; only what is indexed (each document's first `loop.lead_words` words) changes."""
    base = _flat(compose_in_tmp(["experiment=baseline"]))
    mine = _flat(compose_in_tmp(["experiment=lead"]))
    diff = {k for k in set(base) | set(mine) if base.get(k) != mine.get(k)}
    text = (CONFIG_DIR / "experiment" / "lead.yaml").read_text()
    assert diff >= {"corpus_view", "experiment_name"}
    assert all(k.split(".")[-1] in text for k in diff if k != "run_name"), diff
    assert mine["loop.max_iterations"] == 0 and mine["loop.lead_words"] >= 1
