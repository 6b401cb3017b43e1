"""Train a YOLOv5 detector: ``python run_train.py model=yolov5s data=coco128 hyp.lr0=0.01`` (the ``yolo-train`` command)."""
from yolo.train_cli import main

if __name__ == "__main__":
    main()
