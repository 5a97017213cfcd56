// A safe Markdown subset, built as DOM nodes from text.
//
// Model output is never given to innerHTML: every piece of text becomes a
// Text node, so `<img onerror=...>` or `<script>` in an answer shows as those
// characters and runs nothing.  Supported, as models write them: paragraphs,
// headings, fenced code blocks (with a copy button and syntax colours),
// bullet and numbered lists (nested by indentation, numbering kept across a
// blank line, `[ ]` / `[x]` task items), tables (GitHub's pipes, with column
// alignment), block quotes, rules, and inline code, **bold**, *italics* /
// _italics_, ~~strikethrough~~ and [links](https://...) (http, https and
// mailto only).
//
// No block reaches over a blank line outside a code fence: the page draws a
// streaming answer's text before its last such line once and keeps it
// (app.js, Transcript.draw), which gives what rendering the whole text gives.

const FENCE = /^\s*(```+|~~~+)\s*([\w+-]*)\s*$/;
const ITEM = /^(\s*)([-*+]|(\d{1,9})[.)])\s+(.*)$/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
const RULE = /^\s{0,3}([-*_])(?:\s*\1){2,}\s*$/;
const QUOTE = /^\s{0,3}>\s?/;
const TABLE_RULE = /^\s*\|?\s*:?-+:?\s*(?:\|\s*:?-+:?\s*)*\|?\s*$/;
// Quotes and lists nest at most this deep; deeper marks are text.  (">"
// five thousand times over was a recursion that overflowed the stack.)
const MAX_NEST = 8;

export function renderMarkdown(text, labels = {}) {
  return blocks(text.replace(/\r\n?/g, "\n").split("\n"), labels);
}

function blocks(lines, labels, depth = 0) {
  const root = document.createDocumentFragment();
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(FENCE);
    if (fence) {
      const body = [];
      i++;
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
      i++;   // the closing fence (or the end of a still-streaming answer)
      root.append(codeBlock(body.join("\n"), fence[2], labels));
    } else if (!line.trim()) {
      i++;
    } else if (RULE.test(line)) {
      root.append(document.createElement("hr"));
      i++;
    } else if (HEADING.test(line)) {
      const [, marks, words] = line.match(HEADING);
      root.append(el(`h${marks.length}`, words));
      i++;
    } else if (depth < MAX_NEST && QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && QUOTE.test(lines[i])) inner.push(lines[i++].replace(QUOTE, ""));
      const quote = document.createElement("blockquote");
      quote.append(blocks(inner, labels, depth + 1));
      root.append(quote);
    } else if (ITEM.test(line)) {
      const [list, next] = listAt(lines, i, depth);
      root.append(list);
      i = next;
    } else if (tableStarts(lines, i)) {
      const [table, next] = tableAt(lines, i);
      root.append(table);
      i = next;
    } else {
      const para = [];
      while (i < lines.length && lines[i].trim() && !startsBlock(lines, i, depth)) {
        para.push(lines[i++]);
      }
      const p = document.createElement("p");
      para.forEach((l, n) => { if (n) p.append(document.createElement("br")); p.append(inline(l)); });
      root.append(p);
    }
  }
  return root;
}

function startsBlock(lines, i, depth) {
  const line = lines[i];
  return FENCE.test(line) || ITEM.test(line) || RULE.test(line) || HEADING.test(line)
    || (depth < MAX_NEST && QUOTE.test(line)) || tableStarts(lines, i);
}

// A list from its first item at lines[i]: items of the same kind and
// indentation; an item indented deeper starts a list inside the item before
// it; an indented line that is no item continues its item.  A blank line, a
// fence or a line indented less ends it.  Returns [element, next line].
function listAt(lines, i, depth) {
  const first = lines[i].match(ITEM);
  const indent = first[1].length, ordered = first[3] !== undefined;
  const list = document.createElement(ordered ? "ol" : "ul");
  if (ordered && Number(first[3]) !== 1) list.start = Number(first[3]);
  let item = null;
  while (i < lines.length && lines[i].trim() && !FENCE.test(lines[i])) {
    const m = lines[i].match(ITEM);
    const column = lines[i].match(/^\s*/)[0].length;
    if (column < indent || (column === indent && (!m || (m[3] !== undefined) !== ordered))) break;
    if (m && column === indent) {
      item = document.createElement("li");
      const task = m[4].match(/^\[([ xX])\]\s+(.*)$/);
      if (task) {
        const box = document.createElement("input");
        box.type = "checkbox";
        box.disabled = true;
        box.checked = task[1] !== " ";
        item.className = "task";
        item.append(box, inline(task[2]));
      } else {
        item.append(inline(m[4]));
      }
      list.append(item);
      i++;
    } else if (m && item && depth + 1 < MAX_NEST) {
      const [inner, next] = listAt(lines, i, depth + 1);
      item.append(inner);
      i = next;
    } else if (item) {
      item.append(document.createElement("br"), inline(lines[i].trim()));
      i++;
    } else break;
  }
  return [list, i];
}

// A table (GitHub's form): a header row, a rule row of as many cells
// (`---`, `:--`, `:-:`, `--:` for the alignment), then rows until a line
// without a pipe.
function tableStarts(lines, i) {
  if (!lines[i].includes("|") || i + 1 >= lines.length || !TABLE_RULE.test(lines[i + 1])) {
    return false;
  }
  const head = cells(lines[i]).length;
  return head === cells(lines[i + 1]).length && (head === 1 || lines[i + 1].includes("|"));
}

// The table that starts at lines[i]: [element, next line].
function tableAt(lines, i) {
  const head = cells(lines[i]), rule = cells(lines[i + 1]);
  const align = rule.map((c) => (c.startsWith(":") && c.endsWith(":") ? "center"
    : c.endsWith(":") ? "right" : c.startsWith(":") ? "left" : ""));
  const row = (texts, tag) => {
    const tr = document.createElement("tr");
    head.forEach((_, n) => {
      const cell = el(tag, texts[n] ?? "");
      if (align[n]) cell.style.textAlign = align[n];
      tr.append(cell);
    });
    return tr;
  };
  const thead = document.createElement("thead");
  thead.append(row(head, "th"));
  const tbody = document.createElement("tbody");
  i += 2;
  while (i < lines.length && lines[i].trim() && lines[i].includes("|") && !FENCE.test(lines[i])) {
    tbody.append(row(cells(lines[i++]), "td"));
  }
  const table = document.createElement("table");
  table.append(thead, tbody);
  const wrap = document.createElement("div");     // a wide table scrolls, not the page
  wrap.className = "table";
  wrap.append(table);
  return [wrap, i];
}

function cells(line) {
  const inner = line.trim().replace(/^\|/, "").replace(/(?<!\\)\|$/, "");
  return inner.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, "|"));
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
// bold (**only**, so snake__case names survive), strikethrough, italics.  Each rule turns a match into an element whose children are
// made by the same function, so nesting works and text stays text.
const INLINE = [
  [/`([^`]+)`/, (m) => el("code", m[1], true)],
  [/\[([^\]]+)\]\(([^)\s]+)\)/, (m) => link(m[1], m[2])],
  [/\*\*([^*]+)\*\*/, (m) => el("strong", m[1])],
  [/~~([^~\s](?:[^~]*[^~\s])?)~~/, (m) => el("del", m[1])],
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
