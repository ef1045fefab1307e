// The chat page of `persllm serve`: talk to a personified model as one persona at one stage of
// its life, switch stages mid-conversation, and ask the same question at the other stages.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { personas: [], model: "", history: [], busy: false };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value || sessionStorage.getItem("persllm-api-key") || "";
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

async function loadPersonas() {
  const response = await fetch("/ui/personas", { headers: headers() });
  if (response.status === 401) {
    $("key-needed").hidden = false;
    return;
  }
  $("key-needed").hidden = true;
  if (!response.ok) {
    showError("Could not load the personas: " + (await response.text()));
    return;
  }
  const data = await response.json();
  state.personas = data.personas;
  state.model = data.model;
  $("model").textContent = "model: " + data.model + " · personas from " + data.personas_dir;
  $("persona").innerHTML = "";
  for (const p of state.personas) $("persona").add(new Option(p.name + " (" + p.id + ")", p.id));
  fillStages();
}

function persona() {
  return state.personas.find((p) => p.id === $("persona").value);
}

function stage(id) {
  const p = persona();
  return p && p.stages.find((s) => s.id === (id || $("stage").value));
}

function fillStages() {
  const p = persona();
  $("stage").innerHTML = "";
  if (!p) return;
  for (const s of p.stages) $("stage").add(new Option(s.id + " — " + s.when, s.id));
  $("stage").value = p.stages[p.stages.length - 1].id;
  showSystem();
}

function showSystem() {
  const s = stage();
  $("system").value = s ? s.system_prompt : "";
}

function addMessage(role, text, label) {
  const li = document.createElement("li");
  li.className = role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = label;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  li.append(who, body);
  $("messages").append(li);
  return li;
}

function sampling() {
  const number = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  const body = {
    temperature: number("temperature"),
    top_p: number("top_p"),
    top_k: number("top_k"),
    repetition_penalty: number("repetition_penalty"),
    max_tokens: number("max_tokens"),
  };
  if ($("seed").value !== "") body.seed = number("seed");
  return body;
}

// Streams one reply into a new assistant message; returns its text ("" on error).
async function ask(messages, stageId, label) {
  const li = addMessage("assistant", "", label);
  li.dataset.stage = stageId;
  li.dataset.chunks = "0";
  const text = li.querySelector(".text");
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: headers(),
    body: JSON.stringify({ model: state.model, messages, stream: true, ...sampling() }),
  });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    if (response.status === 401) $("key-needed").hidden = false;
    showError("HTTP " + response.status + ": " + ((body.error && body.error.message) || ""));
    li.remove();
    return "";
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 2);
      if (!event.startsWith("data:")) continue;
      const data = event.slice(5).trim();
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) {
        showError(chunk.error.message);
        continue;
      }
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
      if (delta) {
        text.textContent += delta;
        li.dataset.chunks = String(Number(li.dataset.chunks) + 1);
      }
    }
  }
  li.dataset.done = "true";
  return text.textContent;
}

function thread(systemPrompt, history) {
  return [{ role: "system", content: systemPrompt }, ...history.map(({ role, content }) => ({ role, content }))];
}

async function send(event) {
  event.preventDefault();
  const question = $("input").value.trim();
  if (!question || state.busy) return;
  const s = stage();
  if (!s) return;
  state.busy = true;
  showError("");
  $("input").value = "";
  state.history.push({ role: "user", content: question });
  addMessage("user", question, "you");
  const reply = await ask(thread(s.system_prompt, state.history), s.id, persona().name + " · " + s.id);
  if (reply) state.history.push({ role: "assistant", content: reply });
  else state.history.pop();
  state.busy = false;
}

// The last question again, at every other stage, with the conversation before it.
async function compare() {
  const last = state.history.map((m) => m.role).lastIndexOf("user");
  if (last < 0 || state.busy) return;
  state.busy = true;
  const before = state.history.slice(0, last + 1);
  for (const s of persona().stages) {
    if (s.id === $("stage").value) continue;
    await ask(thread(s.system_prompt, before), s.id, persona().name + " · " + s.id + " (compared)");
  }
  state.busy = false;
}

$("persona").addEventListener("change", fillStages);
$("stage").addEventListener("change", showSystem);
$("composer").addEventListener("submit", send);
$("compare").addEventListener("click", compare);
$("clear").addEventListener("click", () => {
  state.history = [];
  $("messages").innerHTML = "";
});
$("api-key").addEventListener("change", () => {
  sessionStorage.setItem("persllm-api-key", $("api-key").value);
  loadPersonas();
});
$("api-key").value = sessionStorage.getItem("persllm-api-key") || "";
loadPersonas();
