"""validate() refuses a precision the device cannot run, naming the device and the alternative.

The device's answers are patched on DeepSpeed's accelerator object (the one its engine asks in
`_do_sanity_check`), so these cases run the same on any machine.
"""

import pytest
from deepspeed.accelerator import get_accelerator

from zenlm.config import ConfigError, load_config
from zenlm.config.validate import check_precision_supported, validate


@pytest.fixture
def accelerator(monkeypatch):
    acc = get_accelerator()

    def set_support(fp16: bool, bf16: bool) -> None:
        monkeypatch.setattr(acc, "is_fp16_supported", lambda: fp16)
        monkeypatch.setattr(acc, "is_bf16_supported", lambda: bf16)

    set_support(True, True)
    return acc, set_support


def test_fp16_refused_names_device_and_alternatives(accelerator):
    acc, set_support = accelerator
    set_support(fp16=False, bf16=True)
    cfg = load_config(overrides=["runtime.precision=fp16"])
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=1)
    assert str(e.value) == (
        f"runtime.precision=fp16 is not supported on this device ({acc.device_name()}: "
        "DeepSpeed's accelerator reports no fp16 support); use bf16 or fp32"
    )


def test_bf16_refused_without_fp16_offers_fp32_only(accelerator):
    acc, set_support = accelerator
    set_support(fp16=False, bf16=False)
    with pytest.raises(ConfigError) as e:
        validate(load_config(overrides=["runtime.precision=bf16"]), world_size=1)
    message = str(e.value)
    assert message.startswith("runtime.precision=bf16 is not supported on this device")
    assert f"({acc.device_name()}: DeepSpeed's accelerator reports no bf16 support)" in message
    assert message.endswith("; use fp32")


def test_bf16_refused_offers_fp16_where_supported(accelerator):
    _, set_support = accelerator
    set_support(fp16=True, bf16=False)
    with pytest.raises(ConfigError, match=r"reports no bf16 support\); use fp16 or fp32$"):
        check_precision_supported("bf16")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_supported_precision_passes(accelerator, precision):
    _, set_support = accelerator
    set_support(fp16=True, bf16=True)
    layout = validate(load_config(overrides=[f"runtime.precision={precision}"]), world_size=1)
    assert layout.world_size == 1


def test_fp32_never_asks_the_device(accelerator):
    _, set_support = accelerator
    set_support(fp16=False, bf16=False)
    check_precision_supported("fp32")  # no error even on a device without any half precision


def test_this_device_matches_deepspeeds_answer():
    """Unpatched: validate() agrees with the accelerator DeepSpeed's engine will ask."""
    acc = get_accelerator()
    for precision, supported in (
        ("bf16", acc.is_bf16_supported()),
        ("fp16", acc.is_fp16_supported()),
    ):
        if supported:
            check_precision_supported(precision)
        else:
            with pytest.raises(ConfigError, match=f"{acc.device_name()}: DeepSpeed"):
                check_precision_supported(precision)
