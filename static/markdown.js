// A safe Markdown subset, built as DOM nodes from text.
//
// Model output is never given to innerHTML: every piece of text becomes a
// Text node, so `<img onerror=...>` or `<script>` in an answer shows as those
// characters and runs nothing.  Supported: paragraphs, fenced code blocks
// (with a copy button), inline code, **bold**, *italics* / _italics_, bullet
// and numbered lists, [links](https://...) (http, https and mailto only).

export function renderMarkdown(text, labels = {}) {
  const root = document.createDocumentFragment();
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*(```+|~~~+)\s*([\w+-]*)\s*$/);
    if (fence) {
      const body = [];
      i++;
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
      i++;   // the closing fence (or the end of a still-streaming answer)
      root.append(codeBlock(body.join("\n"), fence[2], labels));
      continue;
    }
    if (/^\s*([-*+]|\d+[.)])\s+/.test(line)) {
      const ordered = /^\s*\d/.test(line);
      const list = document.createElement(ordered ? "ol" : "ul");
      while (i < lines.length && /^\s*([-*+]|\d+[.)])\s+/.test(lines[i])
             && /^\s*\d/.test(lines[i]) === ordered) {
        const li = document.createElement("li");
        li.append(inline(lines[i].replace(/^\s*([-*+]|\d+[.)])\s+/, "")));
        list.append(li);
        i++;
      }
      root.append(list);
      continue;
    }
    if (!line.trim()) { i++; continue; }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      const h = document.createElement("p");
      const b = document.createElement("strong");
      b.append(inline(heading[2]));
      h.append(b);
      root.append(h);
      i++;
      continue;
    }
    const para = [];
    while (i < lines.length && lines[i].trim() && !/^\s*(```|~~~)/.test(lines[i])
           && !/^\s*([-*+]|\d+[.)])\s+/.test(lines[i])) para.push(lines[i++]);
    const p = document.createElement("p");
    para.forEach((l, n) => { if (n) p.append(document.createElement("br")); p.append(inline(l)); });
    root.append(p);
  }
  return root;
}

function codeBlock(code, lang, labels) {
  const wrap = document.createElement("div");
  wrap.className = "codeblock";
  const pre = document.createElement("pre");
  const el = document.createElement("code");
  if (lang) el.dataset.lang = lang;
  el.textContent = code;
  pre.append(el);
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy";
  copy.textContent = labels.copy || "Copy";
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(code);
      copy.textContent = labels.copied || "Copied";
    } catch {
      copy.textContent = "✗";
    }
    setTimeout(() => { copy.textContent = labels.copy || "Copy"; }, 1500);
  });
  wrap.append(pre, copy);
  return wrap;
}

// Inline spans: code first (nothing inside it is formatted), then links,
// bold (**only**, so snake__case names survive), italics.  Each rule turns a match into an element whose children are
// made by the same function, so nesting works and text stays text.
const INLINE = [
  [/`([^`]+)`/, (m) => el("code", m[1], true)],
  [/\[([^\]]+)\]\(([^)\s]+)\)/, (m) => link(m[1], m[2])],
  [/\*\*([^*]+)\*\*/, (m) => el("strong", m[1])],
  [/\*([^*\s][^*]*)\*|(?<![\w])_([^_\s][^_]*)_(?![\w])/, (m) => el("em", m[1] || m[2])],
];

function inline(text) {
  const frag = document.createDocumentFragment();
  while (text) {
    let best = null;
    for (const [re, make] of INLINE) {
      const m = re.exec(text);
      if (m && (!best || m.index < best.m.index)) best = { m, make };
    }
    if (!best) { frag.append(document.createTextNode(text)); break; }
    if (best.m.index) frag.append(document.createTextNode(text.slice(0, best.m.index)));
    frag.append(best.make(best.m));
    text = text.slice(best.m.index + best.m[0].length);
  }
  return frag;
}

function el(tag, content, plain = false) {
  const node = document.createElement(tag);
  if (plain) node.textContent = content; else node.append(inline(content));
  return node;
}

function link(label, href) {
  let url;
  try { url = new URL(href); } catch { return document.createTextNode(`[${label}](${href})`); }
  if (!["http:", "https:", "mailto:"].includes(url.protocol)) {
    return document.createTextNode(`[${label}](${href})`);
  }
  const a = document.createElement("a");
  a.href = url.href;
  a.target = "_blank";
  a.rel = "noopener noreferrer";
  a.append(inline(label));
  return a;
}
