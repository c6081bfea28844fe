import pytest

from jaxlm.config import Config, load_config, to_yaml
from jaxlm.errors import ConfigError, JaxlmError

from .conftest import REPO


def test_preset_and_overrides():
    config = load_config(REPO / "configs" / "shakespeare.yaml", ["train.steps=7", "mesh.fsdp=2"])
    assert config.name == "shakespeare"
    assert config.train.steps == 7
    assert config.mesh.fsdp == 2
    assert config.model.d_model == 192  # from the YAML, not the dataclass default


def test_config_is_frozen():
    config = load_config()
    with pytest.raises(AttributeError):
        config.train.steps = 3  # type: ignore[misc]


def test_resolved_yaml_round_trips(tmp_path):
    config = load_config(None, ["train.steps=9", "model.vocab_size=3000", "name=x"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(config))
    assert load_config(path) == config


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stpes=5", "config key 'train.stpes': unknown key"),
        ("modle.d_model=5", "config key 'modle': unknown key"),
        ("train.steps=abc", "config key 'train.steps': invalid value 'abc', expected int"),
        ("optim.lr=fast", "config key 'optim.lr': invalid value 'fast', expected float"),
        ("train.steps=0", "config key 'train.steps': must be positive"),
        (
            "model.n_heads=5",
            "config key 'model.n_heads': d_model 256 is not divisible by n_heads 5",
        ),
        ("train.seq_len=2048", "config key 'train.seq_len': 2048 exceeds model.max_len 1024"),
        ("model.dtype=float8", "config key 'model.dtype': must be one of"),
        ("model.remat=some", "config key 'model.remat': must be one of none, full, dots"),
        ("model.remat=save:context+mlp", "config key 'model.remat': save: keeps names of"),
        ("model.remat_offload=context+mlp", "config key 'model.remat_offload': names of"),
        ("model.remat_offload=context", "'model.remat_offload': needs model.remat full or"),
        ("mesh.tensor=0", "config key 'mesh.tensor': must be positive or -1"),
        ("mesh.rules.batch=[data,pipe]", "config key 'mesh.rules.batch': unknown mesh axis 'pipe'"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_offloading_a_kept_activation_is_refused():
    with pytest.raises(ConfigError, match=r"'model.remat_offload': \['key_proj'\] already kept"):
        load_config(None, ["model.remat=save_qkv_proj", "model.remat_offload=context+key_proj"])


def test_bad_yaml_key_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"'train.batch_sise': unknown key \(from .*bad.yaml\)"):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(JaxlmError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


def test_replace_validates():
    with pytest.raises(ConfigError, match="train.batch_size"):
        Config().replace(train={"batch_size": -1})
