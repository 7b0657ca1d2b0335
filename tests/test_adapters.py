"""The DomainBed and Dassl adapters are thin: same method, same hparams, same logits."""
import types

import torch

from tests.conftest import TINY, needs_coop, needs_domainbed

CLASSES = ["circle", "square", "star"]


@needs_domainbed
@needs_coop

def fake_dataset(classnames):
    """What build_model reads of a Dassl dataset: class names and one training item each."""
    items = [types.SimpleNamespace(label=i) for i in range(len(classnames))]
    return types.SimpleNamespace(classnames=classnames, train_x=items, val=None, test=None)

def test_domainbed_and_dassl_give_the_same_logits(tmp_path, tiny_clip):
    import dassl.config
    from dassl.engine.trainer import TrainerBase
    from domainbed import algorithms, hparams_registry
    from domainbed_adapter import patches
    from trainers import dassl_adapter
    patches.patch_loaded()

    weights = tmp_path / "tiny.pt"
    torch.save(tiny_clip[0].state_dict(), weights)
    tiny = dict(TINY, clip_pretrained=str(weights))
    hparams = dict(hparams_registry.default_hparams("AlignCLIP", "CLIPWorld"), **tiny)
    hparams["class_names"] = CLASSES
    torch.manual_seed(0)
    domainbed_algorithm = algorithms.get_algorithm_class("AlignCLIP")((3, 64, 64), 3, 2, hparams)
    domainbed_algorithm.update([(torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0]))])

    cfg = dassl.config.get_cfg_default()
    dassl_adapter.add_method_configs(cfg)
    cfg.DATASET.SUBSAMPLE_CLASSES = "all"
    cfg.TRAINER.NAME = "AlignCLIP"
    assert cfg.TRAINER.ALIGNCLIP.BMA_BETA == 0.1  # recipes/recipes.yaml, harness dassl
    cfg.TRAINER.ALIGNCLIP.BMA_BETA = hparams["bma_beta"]
    cfg.CLIP.MODEL, cfg.CLIP.PRETRAINED = tiny["clip_model"], tiny["clip_pretrained"]
    cfg.TRAINER.ALIGNCLIP.TEMPLATES = tiny["templates"]
    dassl_adapter.register_trainers()
    from dassl.engine import TRAINER_REGISTRY
    trainer = object.__new__(TRAINER_REGISTRY.get("AlignCLIP"))
    TrainerBase.__init__(trainer)
    trainer.cfg, trainer.device, trainer.max_epoch = cfg, torch.device("cpu"), 1
    trainer.train_loader_x = [None] * 5000
    trainer.dm = types.SimpleNamespace(dataset=fake_dataset(CLASSES))
    trainer.num_classes = len(CLASSES)
    trainer.build_model()

    # one typed config in both harnesses; the job's facts in each one's context
    assert trainer.model.cfg == domainbed_algorithm.method.cfg
    assert trainer.model.context.images_per_step == cfg.DATALOADER.TRAIN_X.BATCH_SIZE
    assert domainbed_algorithm.method.context.images_per_step == 2 * hparams["batch_size"]
    assert trainer.model.context.total_steps == 5000
    assert hparams["precision"] == "fp32" and domainbed_algorithm.method.cfg.precision == "auto"
    assert trainer.model.precision == domainbed_algorithm.method.precision == "fp32"  # CPU
    trainer.model.load_state_dict(domainbed_algorithm.method.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(trainer.model_inference(images), domainbed_algorithm.predict(images))


@needs_coop
def test_dassl_prompts_class_names_as_coops_trainers_do():
    import dassl.config
    from dassl.engine import TRAINER_REGISTRY
    from dassl.engine.trainer import TrainerBase
    from trainers import dassl_adapter
    cfg = dassl.config.get_cfg_default()
    dassl_adapter.add_method_configs(cfg)
    cfg.CLIP.MODEL, cfg.CLIP.PRETRAINED = TINY["clip_model"], TINY["clip_pretrained"]
    dassl_adapter.register_trainers()
    trainer = object.__new__(TRAINER_REGISTRY.get("ZSCLIP"))
    TrainerBase.__init__(trainer)
    trainer.cfg, trainer.device, trainer.max_epoch = cfg, torch.device("cpu"), 1
    trainer.train_loader_x = [None]
    names = ["american_bulldog", "t-shirt", "Abyssinian"]
    trainer.dm = types.SimpleNamespace(dataset=fake_dataset(names))
    trainer.num_classes = len(names)
    trainer.build_model()
    assert trainer.model.classnames == ["american bulldog", "t-shirt", "Abyssinian"]
