"""Teacher: detectron2's model-zoo RetinaNet R101-FPN 3x (40.4 box AP), as a LazyConfig built from
detectron2's own ``common/models/retinanet.py`` node. Its weights, trained with the yacs config
``COCO-Detection/retinanet_R_101_FPN_3x.yaml``, have exactly this model's keys."""

from detectron2 import model_zoo

_base = model_zoo.get_config("COCO-Detection/retinanet_R_50_FPN_1x.py")
dataloader = _base.dataloader
model = _base.model
optimizer = _base.optimizer
lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_3x
train = _base.train

model.backbone.bottom_up.stages.depth = 101
train.init_checkpoint = (
    "detectron2://COCO-Detection/retinanet_R_101_FPN_3x/190397697/model_final_971ab9.pkl"
)
# detectron2's model-zoo weights are .pkl pickles, which run code when read: trusted source
train.allow_pickle_weights = True
train.output_dir = "output/lazy/coco/retinanet_R101_teacher"
