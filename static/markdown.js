// A safe Markdown subset, built as DOM nodes from text.
//
// Model output is never given to innerHTML: every piece of text becomes a
// Text node, so `<img onerror=...>` or `<script>` in an answer shows as those
// characters and runs nothing.  Supported: paragraphs, fenced code blocks
// (with a copy button and syntax colours), inline code, **bold**, *italics* / _italics_, bullet
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
  el.append(highlight(code, lang));
  pre.append(el);
  wrap.append(pre, copyButton(() => code, labels));
  return wrap;
}

// A "Copy" button for the text `text()` gives when clicked (a code block's,
// a command's output as shown); it says "Copied" for a moment.
export function copyButton(text, labels = {}) {
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy";
  copy.textContent = labels.copy || "Copy";
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(text());
      copy.textContent = labels.copied || "Copied";
    } catch {
      copy.textContent = "✗";
    }
    setTimeout(() => { copy.textContent = labels.copy || "Copy"; }, 1500);
  });
  return copy;
}

// Syntax colours for the common languages: the code is cut into tokens by
// one regex per language, and each token becomes a <span class="tok-…">
// holding a Text node (never markup).  Unknown languages stay plain.
const WORDS = {
  py: "and as assert async await break class continue def del elif else except False finally for from global if import in is lambda None nonlocal not or pass raise return True try while with yield match case self",
  js: "async await break case catch class const continue default delete do else export extends false finally for function if import in instanceof let new null of return static super switch this throw true try typeof undefined var void while yield interface type enum implements",
  sh: "if then else elif fi for while until do done case esac in function return export local echo cd exit set unset source",
  go: "break case chan const continue default defer else fallthrough for func go goto if import interface map package range return select struct switch type var nil true false",
  rs: "as async await break const continue crate else enum extern false fn for if impl in let loop match mod move mut pub ref return self Self static struct super trait true type unsafe use where while",
  sql: "select from where insert into values update set delete create table drop alter index join left right inner outer on group by order having limit and or not null as distinct primary key",
};
const ALIASES = { python: "py", py: "py", javascript: "js", js: "js", ts: "js", typescript: "js",
  jsx: "js", tsx: "js", json: "json", bash: "sh", sh: "sh", shell: "sh", zsh: "sh", console: "sh",
  go: "go", golang: "go", rust: "rs", rs: "rs", sql: "sql", c: "js", cpp: "js", java: "js" };
const COMMENT = { py: "#[^\n]*", sh: "#[^\n]*", sql: "--[^\n]*", js: "//[^\n]*|/\\*[\\s\\S]*?\\*/",
  go: "//[^\n]*|/\\*[\\s\\S]*?\\*/", rs: "//[^\n]*|/\\*[\\s\\S]*?\\*/", json: "(?!)" };
const TOKENS = {};

function tokenizer(kind) {
  if (!TOKENS[kind]) {
    const words = (WORDS[kind] || "true false null").split(" ").join("|");
    TOKENS[kind] = new RegExp(`(${COMMENT[kind]})|("(?:[^"\\\\\\n]|\\\\.)*"|'(?:[^'\\\\\\n]|\\\\.)*'|\`(?:[^\`\\\\]|\\\\.)*\`)`
      + `|\\b(\\d[\\d_]*(?:\\.\\d+)?(?:e[+-]?\\d+)?|0x[\\da-f]+)\\b|\\b(${words})\\b`, kind === "sql" ? "gi" : "g");
  }
  return TOKENS[kind];
}

export function highlight(code, lang) {
  const frag = document.createDocumentFragment();
  const kind = ALIASES[(lang || "").toLowerCase()];
  if (!kind || code.length > 100000) { frag.append(document.createTextNode(code)); return frag; }
  const re = tokenizer(kind);
  re.lastIndex = 0;
  let at = 0, m;
  while ((m = re.exec(code))) {
    if (!m[0]) { re.lastIndex++; continue; }
    if (m.index > at) frag.append(document.createTextNode(code.slice(at, m.index)));
    const span = document.createElement("span");
    span.className = m[1] ? "tok-comment" : m[2] ? "tok-string" : m[3] ? "tok-number" : "tok-keyword";
    span.textContent = m[0];
    frag.append(span);
    at = m.index + m[0].length;
  }
  if (at < code.length) frag.append(document.createTextNode(code.slice(at)));
  return frag;
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
