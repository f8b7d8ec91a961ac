"""The HTTP API against real models trained in conftest (finetune mode) and a features-mode folder."""

import base64
import io
import json
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from folders import model_folder
from PIL import Image

from lcpn.cascade import Cascade
from lcpn.cli import main
from lcpn.feed import open_source
from lcpn.fsio import read_csv
from lcpn.serve import create_app
from lcpn.serve.limits import Limits

TOKEN = "s3cret-token"
LIMITS = Limits(max_files=4, max_file_mb=0.05)  # 50 KB: the test pictures are far smaller


def files_of(paths):
    return [("files", (Path(p).name, Path(p).read_bytes())) for p in paths]


def png_bytes(width: int, height: int, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, "PNG")
    return buf.getvalue()


def bomb_bytes() -> bytes:
    """A valid small PNG whose header claims 20000 x 20000 pixels (400 megapixels)."""
    data = bytearray(png_bytes(4, 4))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", 20000, 20000)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


@pytest.fixture(scope="module")
def test_images(split):
    return [row["path"] for row in read_csv(split / "test.csv")]


@pytest.fixture(scope="module")
def client(finetuned):
    app = create_app(finetuned, device="cpu", max_batch=50, max_wait_ms=100, limits=LIMITS, token=TOKEN)
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client


def test_predict_answers_what_lcpn_predict_json_prints(client, finetuned, test_images):
    images = test_images[:3]
    printed = CliRunner().invoke(main, ["predict", *images, "--models", str(finetuned), "--format", "json",
                                        "--top-k", "2", "--device", "cpu"])  # fmt: skip
    expected = [json.loads(line) for line in printed.output.splitlines()]
    response = client.post("/v1/predict", params={"top_k": 2}, files=files_of(images))
    assert response.status_code == 200
    answered = response.json()
    assert answered["errors"] == []
    for got, want in zip(answered["predictions"], expected, strict=True):
        assert got == {**want, "image": Path(want["image"]).name}


def test_explain_gives_one_heatmap_per_trained_stage_in_the_image_shape(client, finetuned, test_images):
    picture = Image.open(test_images[0]).convert("RGB").resize((40, 24))
    buf = io.BytesIO()
    picture.save(buf, "PNG")
    response = client.post("/v1/explain", files={"file": ("wide.png", buf.getvalue())})
    assert response.status_code == 200
    body = response.json()
    want = Cascade.load(finetuned, "cpu").predict_batch([picture])[0]
    assert body["prediction"]["path"] == want.path
    assert [s["class"] for s in body["stages"]] == want.path
    assert body["stages"][0]["node"] == "root"
    for stage, confidence in zip(body["stages"], want.confidences):
        assert stage["probability"] == pytest.approx(confidence, abs=1e-5)
        if stage["node"] == "c":  # the constant node
            assert stage["heatmap_png"] is None and "constant" in stage["note"]
        else:
            heatmap = Image.open(io.BytesIO(base64.b64decode(stage["heatmap_png"])))
            assert heatmap.size == (40, 24)


def test_bad_uploads_get_their_status_and_the_good_files_are_still_answered(client, finetuned, test_images):
    good = Path(test_images[0])
    before = sorted(p.relative_to(finetuned) for p in finetuned.rglob("*"))
    jpeg = good.read_bytes()
    cases = {
        422: [("empty.jpg", b""), ("notes.txt", b"not a picture"), ("cut.jpg", jpeg[: len(jpeg) // 2])],
        413: [("bomb.png", bomb_bytes()), ("huge.png", png_bytes(300, 300) + bytes(60_000))],
    }
    for status, bad in cases.items():
        for name, data in bad:
            response = client.post("/v1/predict", files=[("files", ("good.jpg", jpeg)), ("files", (name, data))])
            assert response.status_code == status, name
            body = response.json()
            assert body["predictions"][0]["error"] is None and body["predictions"][0]["path"]
            assert body["predictions"][1]["image"] == name and body["predictions"][1]["error"]
            assert body["errors"] == [{"index": 1, "file": name, "status": status,
                                       "error": body["predictions"][1]["error"]}]  # fmt: skip
            assert name in body["detail"]
    assert client.post("/v1/explain", files={"file": ("notes.txt", b"text")}).status_code == 422
    assert client.post("/v1/explain", files={"file": ("bomb.png", bomb_bytes())}).status_code == 413
    cut = client.post("/v1/explain", files={"file": ("cut.jpg", jpeg[: len(jpeg) // 2])})
    assert cut.status_code == 422 and cut.json()["error"] == str(open_source(jpeg[: len(jpeg) // 2]))
    too_many = client.post("/v1/predict", files=files_of([good] * (LIMITS.max_files + 1)))
    assert too_many.status_code == 413 and "--max-files" in too_many.json()["detail"]
    too_big = client.post("/v1/predict", files=[("files", ("big.bin", bytes(LIMITS.max_body_bytes)))])
    assert too_big.status_code == 413
    assert client.get("/healthz").status_code == 200  # still serving
    assert sorted(p.relative_to(finetuned) for p in finetuned.rglob("*")) == before  # nothing written there


def test_a_missing_or_wrong_token_gets_401_and_health_stays_open(client):
    for header in ("Bearer wrong", f"Basic {TOKEN}", ""):
        response = client.get("/v1/model", headers={"Authorization": header})
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert client.post("/v1/predict", headers={"Authorization": "Bearer x"}, files=files_of([])).status_code == 401
    assert client.get("/healthz", headers={"Authorization": ""}).json() == {"status": "ok"}


def test_fifty_concurrent_requests_are_answered_correctly_in_shared_batches(client, finetuned, test_images):
    cascade = Cascade.load(finetuned, "cpu")
    expected = {p: pred.path for p, pred in zip(test_images, cascade.predict(test_images))}
    sent = [test_images[i % len(test_images)] for i in range(50)]
    before = client.get("/v1/model").json()["batching"]

    def ask(path):
        return client.post("/v1/predict", files=files_of([path]))

    with ThreadPoolExecutor(50) as pool:
        responses = list(pool.map(ask, sent))
    for path, response in zip(sent, responses):
        assert response.status_code == 200
        assert response.json()["predictions"][0]["path"] == expected[path]
    after = client.get("/v1/model").json()["batching"]
    assert after["images"] - before["images"] == 50
    assert after["batches"] - before["batches"] < 50  # some requests shared a batch
    assert after["largest_batch"] > 1


def test_model_describes_the_tree_with_val_accuracy(client):
    model = client.get("/v1/model").json()
    assert (model["mode"], model["backbone"], model["image_size"], model["depth"]) == (
        "finetune", "efficientnet-lite0", 32, 3)  # fmt: skip
    root = model["tree"]
    assert [c["name"] for c in root["children"]] == ["a", "b", "c"]
    assert 0 <= root["val_accuracy"] <= 1 and sum(root["class_counts"].values()) == root["val_images"]
    constant = root["children"][2]
    assert constant["kind"] == "constant" and constant["children"][0]["leaf"]
    assert model["versions"]["trained_with"]["lcpn"] and model["limits"]["max_files"] == LIMITS.max_files


def test_the_page_is_served_and_needs_nothing_from_elsewhere(client):
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    for asset in ("index.html", "app.js", "style.css"):
        text = client.get(f"/static/{asset}").text
        assert "http://" not in text and "https://" not in text


def test_a_folder_that_cannot_be_served_stops_the_start(tmp_path):
    result = CliRunner().invoke(main, ["serve", "--models", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = CliRunner().invoke(main, ["serve", "--models", str(tmp_path), "--token-env", "LCPN_TEST_UNSET_TOKEN"])
    assert result.exit_code == 2 and "LCPN_TEST_UNSET_TOKEN" in result.output


def test_features_mode_serves_and_explains_with_a_constant_root(tmp_path):
    models = model_folder(tmp_path / "models", ["a/x", "a/y", "a/z"], mode="features")
    with TestClient(create_app(models, device="cpu")) as client:
        predicted = client.post("/v1/predict", files=[("files", ("red.png", png_bytes(20, 30)))]).json()
        explained = client.post("/v1/explain", files={"file": ("red.png", png_bytes(20, 30))}).json()
    assert explained["prediction"] == predicted["predictions"][0]
    root, head = explained["stages"]
    assert root["heatmap_png"] is None and "nothing to explain" in root["note"]
    assert Image.open(io.BytesIO(base64.b64decode(head["heatmap_png"]))).size == (20, 30)


def test_an_onnx_export_serves_torchs_answers_and_says_why_it_cannot_explain(finetuned, test_images, tmp_path):
    from lcpn.export import export

    export(finetuned, tmp_path / "onnx")
    images = test_images[:3]
    with TestClient(create_app(finetuned, device="cpu")) as client:
        by_torch = client.post("/v1/predict", files=files_of(images), params={"top_k": 2}).json()
    with TestClient(create_app(tmp_path / "onnx", runtime="onnx")) as client:
        by_onnx = client.post("/v1/predict", files=files_of(images), params={"top_k": 2}).json()
        explained = client.post("/v1/explain", files={"file": ("red.png", png_bytes(20, 30))})
        model = client.get("/v1/model").json()
    assert [p["path"] for p in by_onnx["predictions"]] == [p["path"] for p in by_torch["predictions"]]
    for onnx, torch_ in zip(by_onnx["predictions"], by_torch["predictions"]):
        assert onnx["confidences"] == pytest.approx(torch_["confidences"], abs=1e-4)
    assert explained.status_code == 501 and "need the trained PyTorch models" in explained.json()["detail"]
    settings = (model["runtime"], model["explanations"], model["mode"], model["image_size"])
    assert settings == ("onnx", False, "finetune", 32)
    root = model["tree"]
    assert root["kind"] == "onnx" and root["val_accuracy"] is None and root["children"][2]["kind"] == "constant"
