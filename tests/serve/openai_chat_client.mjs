// Drives `mambacpp serve`'s /v1/chat/completions with the official `openai` npm package
// (test_serve runs it against a model folder with a chat template). Prints one JSON line with
// what it saw; exits non-zero on any mismatch. Env: BASE_URL (http://127.0.0.1:PORT/v1), MODEL.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.BASE_URL, apiKey: "sk-test", maxRetries: 0 });
const fail = (msg) => { console.error("openai_chat_client: " + msg); process.exit(1); };

const req = {
  model: process.env.MODEL,
  messages: [{ role: "system", content: "You are terse." }, { role: "user", content: "Say something" }],
  max_tokens: 10, temperature: 0, ignore_eos: true,
};
const c = await client.chat.completions.create(req);
if (c.object !== "chat.completion" || c.choices.length !== 1) fail("shape " + JSON.stringify(c));
const m = c.choices[0].message;
if (m.role !== "assistant" || typeof m.content !== "string") fail("message " + JSON.stringify(m));
if (c.usage.completion_tokens !== 10) fail("usage " + JSON.stringify(c.usage));

let streamed = "", finish = null, chunks = 0, role = null;
const stream = await client.chat.completions.create({ ...req, stream: true });
for await (const ch of stream) {
  chunks++;
  if (ch.object !== "chat.completion.chunk") fail("chunk object " + ch.object);
  for (const choice of ch.choices) {
    if (choice.delta.role) role = choice.delta.role;
    if (choice.delta.content) streamed += choice.delta.content;
    if (choice.finish_reason) finish = choice.finish_reason;
  }
}
if (role !== "assistant") fail("stream role " + role);
if (streamed !== m.content) fail("stream " + JSON.stringify(streamed) + " vs " + JSON.stringify(m.content));
if (finish !== "length") fail("finish_reason " + finish);

let status = 0;
try {
  await client.chat.completions.create({ ...req, messages: [{ role: "wizard", content: "x" }] });
} catch (e) {
  if (!(e instanceof OpenAI.APIError)) fail("not an APIError: " + e);
  status = e.status;
  if (e.param !== "messages") fail("error param " + e.param);
}
if (status !== 400) fail("bad request status " + status);

console.log(JSON.stringify({ content: m.content, chunks, finish, status }));
