// Drives `mambacpp serve` with the official `openai` npm package (test_serve runs it after
// installing the package into a scratch folder). Prints one JSON line with what it saw; exits
// non-zero on any mismatch. Env: BASE_URL (http://127.0.0.1:PORT/v1), MODEL, PROMPT.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.BASE_URL, apiKey: "sk-test", maxRetries: 0 });
const fail = (msg) => { console.error("openai_client: " + msg); process.exit(1); };

const models = await client.models.list();
const ids = models.data.map((m) => m.id);
if (!ids.includes(process.env.MODEL)) fail("model list " + JSON.stringify(ids));

const req = { model: process.env.MODEL, prompt: process.env.PROMPT, max_tokens: 12,
              temperature: 0, ignore_eos: true };
const c = await client.completions.create(req);
if (c.object !== "text_completion" || c.choices.length !== 1) fail("shape " + JSON.stringify(c));
if (c.usage.completion_tokens !== 12) fail("usage " + JSON.stringify(c.usage));

let streamed = "", finish = null, chunks = 0;
const stream = await client.completions.create({ ...req, stream: true });
for await (const ch of stream) {
  chunks++;
  for (const choice of ch.choices) {
    streamed += choice.text;
    if (choice.finish_reason) finish = choice.finish_reason;
  }
}
if (streamed !== c.choices[0].text) fail("stream " + JSON.stringify(streamed) + " vs " + JSON.stringify(c.choices[0].text));
if (finish !== "length") fail("finish_reason " + finish);

let status = 0;
try {
  await client.completions.create({ ...req, temperature: "hot" });
} catch (e) {
  if (!(e instanceof OpenAI.APIError)) fail("not an APIError: " + e);
  status = e.status;
  if (e.param !== "temperature") fail("error param " + e.param);
}
if (status !== 400) fail("bad request status " + status);

console.log(JSON.stringify({ text: c.choices[0].text, chunks, finish, status }));
