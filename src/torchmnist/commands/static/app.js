// torchmnist serve: draw on the canvas, or drop or choose a picture; the server classifies it
// with the same preprocessing as `torchmnist predict` and sends back the probabilities and the
// 28x28 image the model saw. No framework, no build step: this file is the whole page's code.
"use strict";

const canvas = document.getElementById("canvas");
const pen = canvas.getContext("2d");
const bars = document.getElementById("bars");
const DEBOUNCE_MS = 150; // while drawing, ask at most this often
let drawn = false, timer = null, asked = 0;

function blank() {
  pen.fillStyle = "#fff";
  pen.fillRect(0, 0, canvas.width, canvas.height);
  drawn = false;
}

function showResult(result) {
  document.getElementById("prediction").textContent = result.class;
  document.getElementById("confidence").textContent =
    `${(100 * result.probability).toFixed(1)}%`;
  document.getElementById("seen").src = result.preprocessed;
  result.probabilities.forEach((p, i) => {
    const row = bars.children[i];
    row.querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
    row.querySelector(".value").textContent = `${(100 * p).toFixed(1)}%`;
    row.classList.toggle("top", i === result.prediction);
  });
  document.getElementById("error").textContent = "";
}

function clearResult() {
  document.getElementById("prediction").textContent = "–";
  document.getElementById("confidence").textContent = "";
  document.getElementById("seen").removeAttribute("src");
  for (const row of bars.children) {
    row.querySelector(".fill").style.width = "0";
    row.querySelector(".value").textContent = "";
    row.classList.remove("top");
  }
}

async function classify(body, headers) {
  const mine = ++asked; // answers to older requests that arrive late are dropped
  try {
    const response = await fetch("/api/predict", { method: "POST", body, headers });
    const result = await response.json();
    if (mine !== asked) return;
    if (!response.ok) throw new Error(result.error || response.statusText);
    showResult(result);
  } catch (error) {
    if (mine === asked) document.getElementById("error").textContent = error.message;
  }
}

function classifyDrawing() {
  if (!drawn) return;
  canvas.toBlob((png) => classify(png, { "Content-Type": "image/png" }), "image/png");
}

function later() {
  clearTimeout(timer);
  timer = setTimeout(classifyDrawing, DEBOUNCE_MS);
}

// Pointer events: one code path for a mouse, a pen and a finger.
let last = null;
function point(event) {
  const box = canvas.getBoundingClientRect();
  return [(event.clientX - box.left) * canvas.width / box.width,
          (event.clientY - box.top) * canvas.height / box.height];
}
canvas.addEventListener("pointerdown", (event) => {
  canvas.setPointerCapture(event.pointerId);
  last = point(event);
  pen.beginPath();
  pen.arc(last[0], last[1], pen.lineWidth / 2, 0, 2 * Math.PI);
  pen.fillStyle = "#000";
  pen.fill();
  drawn = true;
  later();
});
canvas.addEventListener("pointermove", (event) => {
  if (last === null) return;
  const next = point(event);
  pen.beginPath();
  pen.moveTo(...last);
  pen.lineTo(...next);
  pen.stroke();
  last = next;
  drawn = true;
  later();
});
for (const end of ["pointerup", "pointercancel"]) {
  canvas.addEventListener(end, () => {
    if (last === null) return;
    last = null;
    clearTimeout(timer);
    classifyDrawing(); // at once when a stroke ends
  });
}

function classifyFile(file) {
  if (!file) return;
  blank();
  const form = new FormData();
  form.append("image", file, file.name);
  classify(form, {});
  // Show the picture on the canvas too, scaled to fit.
  const url = URL.createObjectURL(file);
  const picture = new Image();
  picture.onload = () => {
    const scale = Math.min(canvas.width / picture.width, canvas.height / picture.height);
    const w = picture.width * scale, h = picture.height * scale;
    pen.drawImage(picture, (canvas.width - w) / 2, (canvas.height - h) / 2, w, h);
    URL.revokeObjectURL(url);
  };
  picture.src = url;
}

document.getElementById("clear").addEventListener("click", () => {
  blank();
  asked++;
  clearResult();
});
document.getElementById("file").addEventListener("change", (event) => {
  classifyFile(event.target.files[0]);
  event.target.value = "";
});
canvas.addEventListener("dragover", (event) => {
  event.preventDefault();
  canvas.classList.add("dragging");
});
canvas.addEventListener("dragleave", () => canvas.classList.remove("dragging"));
canvas.addEventListener("drop", (event) => {
  event.preventDefault();
  canvas.classList.remove("dragging");
  classifyFile(event.dataTransfer.files[0]);
});

async function start() {
  pen.lineWidth = 22;
  pen.lineCap = pen.lineJoin = "round";
  pen.strokeStyle = "#000";
  blank();
  const about = await (await fetch("/api/model")).json();
  const accuracy = about.test_accuracy === null ? "" :
    `, ${(100 * about.test_accuracy).toFixed(2)}% on its test set`;
  document.getElementById("about").textContent =
    `${about.model} model trained on ${about.dataset}${accuracy}`;
  for (const name of about.classes) {
    const row = document.createElement("li");
    row.innerHTML = '<span class="name"></span><span class="bar"><span class="fill"></span>' +
      '</span><span class="value"></span>';
    row.querySelector(".name").textContent = name;
    bars.appendChild(row);
  }
  document.body.dataset.ready = "true";
}
start();
