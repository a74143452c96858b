"""TID ViTDet-B (ViT-B Mask R-CNN, ``mask_rcnn_vitdet_b_teacher.py``, RGB) -> R50-FPN Mask R-CNN
trained from scratch with large-scale jitter, 100 epochs: the student, data and schedule are
detectron2's ``new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py`` (BGR; the teacher gets its images
flipped to RGB with its own normalisation). Both output p2..p6 of 256 channels (strides 4..64,
inputs padded to multiples of 32), so the levels pair without adapters; the significance comes
from the RPN and the box head of each (the mask heads train as usual).

    python tools/lazy_train_net.py --config-file configs/lazy/coco/tid_vitdet_b_R50.py --num-gpus 8
"""

from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from tid_d2.lazy import build_lazy_distiller

_base = model_zoo.get_config("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py")
dataloader = _base.dataloader
optimizer = _base.optimizer
lr_multiplier = _base.lr_multiplier
train = _base.train

model = L(build_lazy_distiller)(
    student=_base.model,
    tid=dict(
        allow_pickle_weights=True,  # the teacher's weights: detectron2's model zoo (.pkl)
        teacher=dict(
            config_file="configs/lazy/coco/mask_rcnn_vitdet_b_teacher.py",
            weights="detectron2://ViTDet/COCO/mask_rcnn_vitdet_b/f325346929/"
            "model_final_61ccd1.pkl",
        ),
    ),
    student_input_format="${..dataloader.train.mapper.image_format}",
    vis_period=1000,
)
train.output_dir = "output/lazy/coco/tid_vitdet_b_R50"
