"""cohort_client against the contract: environment read and checked, outputs checked as the
executor checks them, datasets read as Cohort reads them. Run with
``python -m unittest discover -s python/cohort_client/tests``."""

import json
import os
import struct
import tempfile
import unittest

import numpy as np
from safetensors.numpy import load_file, save_file

from cohort_client import ContractError, Task, load_dataset


class ContractTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        d = self.dir.name
        self.csv = os.path.join(d, "data.csv")
        with open(self.csv, "w") as f:
            f.write("a,b,label\n1,2,0\n3,4,1\n")
        save_file({"fc0.weight": np.ones((2, 2), np.float32),
                   "fc0.bias": np.zeros(2, np.float32)}, os.path.join(d, "in.safetensors"))
        self.env = {
            "COHORT_TASK_KIND": "train",
            "COHORT_INPUT_MODEL": os.path.join(d, "in.safetensors"),
            "COHORT_OUTPUT_MODEL": os.path.join(d, "out.safetensors"),
            "COHORT_OUTPUT_METRICS": os.path.join(d, "metrics.json"),
            "COHORT_DATASET": json.dumps({"name": "t", "format": "csv", "path": self.csv,
                                          "scale": 0.5}),
            "COHORT_HYPERPARAMETERS": json.dumps({"epochs": 3, "optimizer": {"lr": 0.1}}),
            "COHORT_SCRATCH_DIR": d,
        }

    def tearDown(self):
        self.dir.cleanup()

    def test_a_task_reads_its_environment(self):
        task = Task.from_env(self.env)
        self.assertEqual((task.kind, task.epochs, task.lr, task.batch_size), ("train", 3, 0.1, 32))
        x, y = task.load_data()
        np.testing.assert_array_equal(x, [[0.5, 1.0], [1.5, 2.0]])
        np.testing.assert_array_equal(y, [0, 1])
        for missing in ("COHORT_TASK_KIND", "COHORT_DATASET"):
            env = dict(self.env)
            del env[missing]
            with self.assertRaisesRegex(ContractError, missing):
                Task.from_env(env)
        with self.assertRaisesRegex(ContractError, "not JSON"):
            Task.from_env(dict(self.env, COHORT_HYPERPARAMETERS="{"))

    def test_the_model_written_is_the_models_tensors_finite(self):
        task = Task.from_env(self.env)
        model = task.load_model()
        model["fc0.weight"] += 1
        task.save_model(model)
        self.assertEqual(float(load_file(task.output_model)["fc0.weight"][0, 0]), 2.0)
        with self.assertRaisesRegex(ContractError, "NaN"):
            task.save_model(dict(model, **{"fc0.bias": np.array([np.nan, 0], np.float32)}))
        with self.assertRaisesRegex(ContractError, "shape"):
            task.save_model(dict(model, **{"fc0.bias": np.zeros(3, np.float32)}))
        with self.assertRaisesRegex(ContractError, "lacks tensor 'fc0.bias'"):
            task.save_model({"fc0.weight": model["fc0.weight"]})
        with self.assertRaisesRegex(ContractError, "not in the model"):
            task.save_model(dict(model, extra=np.zeros(1, np.float32)))

    def test_metrics_are_bounded(self):
        task = Task.from_env(self.env)
        task.write_metrics(samples=2, loss=0.5)
        with open(task.output_metrics) as f:
            self.assertEqual(json.load(f), {"samples": 2, "loss": 0.5})
        for bad in (dict(samples=0), dict(samples=1.5), dict(samples=2, loss=float("nan")),
                    dict(samples=2, accuracy=1.5)):
            with self.assertRaises(ContractError):
                task.write_metrics(**bad)
        evaluation = Task.from_env(dict(self.env, COHORT_TASK_KIND="evaluate"))
        self.assertIsNone(evaluation.output_model)
        with self.assertRaisesRegex(ContractError, "loss and accuracy"):
            evaluation.write_metrics(samples=2, loss=0.5)

    def test_npy_and_idx_datasets_read_as_cohort_reads_them(self):
        d = self.dir.name
        np.save(os.path.join(d, "x.npy"), np.arange(8, dtype=np.float32).reshape(2, 2, 2))
        np.save(os.path.join(d, "y.npy"), np.array([1, 0]))
        x, y = load_dataset({"format": "npy", "path": os.path.join(d, "x.npy"),
                             "labels": os.path.join(d, "y.npy")})
        self.assertEqual(x.shape, (2, 4))
        np.testing.assert_array_equal(y, [1, 0])
        with open(os.path.join(d, "x.idx"), "wb") as f:
            f.write(bytes([0, 0, 0x08, 3]) + struct.pack(">III", 2, 1, 2) + bytes([0, 255, 51, 102]))
        with open(os.path.join(d, "y.idx"), "wb") as f:
            f.write(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 2) + bytes([3, 4]))
        x, y = load_dataset({"format": "idx", "path": os.path.join(d, "x.idx"),
                             "labels": os.path.join(d, "y.idx"), "eval_path": ""}, "eval")
        np.testing.assert_allclose(x, [[0, 1], [0.2, 0.4]])
        np.testing.assert_array_equal(y, [3, 4])
        with self.assertRaisesRegex(ContractError, "needs a labels file"):
            load_dataset({"format": "npy", "path": os.path.join(d, "x.npy")})


if __name__ == "__main__":
    unittest.main()
