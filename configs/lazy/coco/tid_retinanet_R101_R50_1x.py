"""TID RetinaNet R101-FPN -> R50-FPN, 1x, on COCO at detectron2's settings: the student, data and
schedule are detectron2's ``COCO-Detection/retinanet_R_50_FPN_1x.py`` (its model is
``common/models/retinanet.py``), the teacher is ``retinanet_R101_teacher.py`` with its
model-zoo weights (``configs/coco/tid_retinanet_R101_R50_1x.yaml`` as a LazyConfig).

    python tools/lazy_train_net.py --config-file configs/lazy/coco/tid_retinanet_R101_R50_1x.py \\
        --num-gpus 8
"""

from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from tid_d2.lazy import build_lazy_distiller

_base = model_zoo.get_config("COCO-Detection/retinanet_R_50_FPN_1x.py")
dataloader = _base.dataloader
optimizer = _base.optimizer
lr_multiplier = _base.lr_multiplier
train = _base.train

model = L(build_lazy_distiller)(
    student=_base.model,
    tid=dict(
        # the teacher's and the student's ImageNet initialisation are detectron2's .pkl files
        allow_pickle_weights=True,
        teacher=dict(
            config_file="configs/lazy/coco/retinanet_R101_teacher.py",
            weights="detectron2://COCO-Detection/retinanet_R_101_FPN_3x/190397697/"
            "model_final_971ab9.pkl",
        ),
    ),
    student_input_format="${..dataloader.train.mapper.image_format}",
    vis_period=1000,
)
train.output_dir = "output/lazy/coco/tid_retinanet_R101_R50_1x"
