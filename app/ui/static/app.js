// The dashboard: sign in, pick an account, watch images change state live, read a build log
// as it grows, list models and manifests, and (where the service has them) web services.
// One module, no framework, no build step.
//
// The access token is kept in sessionStorage only (never in a URL or localStorage) and the
// client secret is never kept at all: it goes to the token endpoint once and the field is
// cleared. Nothing here logs or renders either.

const ROOT = new URL("../", document.baseURI); // the service; this page is at <service>/ui/
const FINAL_STATES = new Set(["Succeeded", "Failed", "Cancelled"]);
const STATE_RANK = { NotStarted: 0, Running: 1, Succeeded: 2, Failed: 2, Cancelled: 2 };
const PAGE_SIZE = 50;
const LOG_POLL_MS = 1000;
const POLL_FALLBACK_MS = 5000; // when the service has no event stream
const STREAM_IDLE_MS = 45000; // keep-alives come every ~15 s: silence this long means a dead link
const MAX_BACKOFF_MS = 30000;
const SERVICES_POLL_MS = 3000; // web services have no event stream here: the list is polled
const SERVICE_LOG_LINES = 200;
const TABS = ["images", "models", "manifests", "services"];
const SESSION_KEY = "mms.session"; // {token, expiresAt}
const PLACE_KEY = "mms.place"; // {subscription, resourceGroup, account}

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** Thrown after a 401 has already sent the user back to the sign-in form. */
class SignedOut extends Error {}

let session = null; // {token, expiresAt}
let place = null; // {subscription, resourceGroup, account}
let expiryTimer = null;
let generation = 0; // bumped on sign-out and account change: late answers of the old one are dropped

// ---------------------------------------------------------------- HTTP

function serviceUrl(path, params) {
  const url = new URL(path, ROOT);
  for (const [k, v] of Object.entries(params || {})) url.searchParams.set(k, v);
  return url;
}

function accountUrl(rest, params) {
  const p = place;
  const base =
    `api/subscriptions/${encodeURIComponent(p.subscription)}` +
    `/resourceGroups/${encodeURIComponent(p.resourceGroup)}/accounts/${encodeURIComponent(p.account)}`;
  return serviceUrl(rest ? `${base}/${rest}` : base, params);
}

/** A nextLink as a same-origin URL (the service builds it from the Host it was asked on). */
function pageUrl(link) {
  const url = new URL(link, ROOT);
  return new URL(url.pathname + url.search, ROOT.origin);
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  let code;
  try {
    const body = await response.json();
    if (body && typeof body.message === "string") {
      message = body.message;
      code = body.code;
    } else if (body && typeof body.detail === "string") {
      message = body.detail;
    }
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, message, code);
}

/** fetch() with the bearer token; a 401 signs out (with a message) and throws SignedOut. */
async function request(url, { headers = {}, signal, cache = "no-cache", method = "GET" } = {}) {
  if (!session) throw new SignedOut();
  const response = await fetch(url, {
    method,
    headers: { ...headers, Authorization: `Bearer ${session.token}` },
    signal,
    cache,
    credentials: "omit",
    referrerPolicy: "no-referrer",
  });
  if (response.status === 401) {
    const refused = await errorOf(response);
    signOut({
      error: `The service no longer accepts your sign-in (the token expired or is invalid): ${refused.message}. Sign in again.`,
      keepPlace: true,
    });
    throw new SignedOut();
  }
  return response;
}

async function getJson(url, signal) {
  const response = await request(url, { headers: { Accept: "application/json" }, signal });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// ---------------------------------------------------------------- messages and views

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function showNotice(text) {
  $("notice").textContent = text;
  $("notice").hidden = !text;
}

function clearMessages() {
  showError("");
  showNotice("");
}

function reportFailure(prefix, error) {
  if (error instanceof SignedOut || error?.name === "AbortError") return;
  showError(`${prefix}: ${error.message}`);
}

function showView(name) {
  for (const view of ["signin", "account", "dashboard"]) $(`${view}-view`).hidden = view !== name;
  $("who").hidden = !session;
  $("change-account").hidden = name !== "dashboard";
  $("who-account").textContent =
    name === "dashboard" ? `${place.subscription} / ${place.resourceGroup} / ${place.account}` : "";
}

function busy(button, on) {
  button.disabled = on;
  button.setAttribute("aria-busy", on ? "true" : "false");
}

function formatTime(iso) {
  const node = document.createElement("time");
  if (!iso) return node;
  node.dateTime = iso;
  const when = new Date(iso);
  node.textContent = Number.isNaN(when.getTime()) ? iso : when.toLocaleString();
  return node;
}

function cell(content, className) {
  const td = document.createElement("td");
  if (className) td.className = className;
  if (content instanceof Node) td.append(content);
  else td.textContent = content == null ? "" : String(content);
  return td;
}

// ---------------------------------------------------------------- signing in and out

function tokenExpiry(token) {
  // The exp claim, to sign out when it passes; the service checks the token, not this.
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(payload.padEnd(Math.ceil(payload.length / 4) * 4, "=")));
    return typeof claims.exp === "number" ? claims.exp * 1000 : null;
  } catch {
    return null;
  }
}

async function tokenFromPrincipal(clientId, secret) {
  const response = await fetch(serviceUrl("oauth2/token"), {
    method: "POST",
    headers: { "Content-Type": "application/x-www-form-urlencoded", Accept: "application/json" },
    body: new URLSearchParams({ grant_type: "client_credentials", client_id: clientId, client_secret: secret }),
    cache: "no-store",
    credentials: "omit",
    referrerPolicy: "no-referrer",
  });
  if (!response.ok) throw await errorOf(response);
  const body = await response.json();
  return { token: body.access_token, expiresAt: Date.now() + Number(body.expires_in || 0) * 1000 };
}

function startSession(next) {
  session = next;
  sessionStorage.setItem(SESSION_KEY, JSON.stringify(next));
  clearTimeout(expiryTimer);
  if (next.expiresAt) {
    const left = next.expiresAt - Date.now();
    expiryTimer = setTimeout(
      () => signOut({ error: "Your sign-in expired. Sign in again.", keepPlace: true }),
      Math.max(0, Math.min(left, 2 ** 31 - 1)),
    );
  }
}

function signOut({ error = "", notice = "", keepPlace = false } = {}) {
  generation += 1;
  stopStream();
  closeLog();
  clearTimeout(expiryTimer);
  session = null;
  sessionStorage.removeItem(SESSION_KEY);
  if (!keepPlace && place) {
    place = { ...place, account: null };
    sessionStorage.setItem(PLACE_KEY, JSON.stringify(place));
  }
  resetAccountData();
  showView("signin");
  showError(error);
  showNotice(notice);
  $("client-secret").value = "";
  $("access-token").value = "";
}

async function onSignIn(event) {
  event.preventDefault();
  clearMessages();
  const button = $("signin-submit");
  const method = new FormData($("signin-form")).get("method");
  busy(button, true);
  try {
    let next;
    if (method === "token") {
      const token = $("access-token").value.trim();
      $("access-token").value = "";
      if (!token) throw new ApiError(0, "Paste an access token.");
      next = { token, expiresAt: tokenExpiry(token) };
    } else {
      const clientId = $("client-id").value.trim();
      const secret = $("client-secret").value;
      $("client-secret").value = "";
      if (!clientId || !secret) throw new ApiError(0, "Enter the client id and the client secret.");
      next = await tokenFromPrincipal(clientId, secret);
    }
    startSession(next);
    if (place?.account) openDashboard(place);
    else openAccountPicker();
  } catch (error) {
    showError(`Sign-in failed: ${error.message}`);
    (method === "token" ? $("access-token") : $("client-secret")).focus();
  } finally {
    busy(button, false);
  }
}

function onMethodChange() {
  const byToken = new FormData($("signin-form")).get("method") === "token";
  $("principal-fields").hidden = byToken;
  $("token-fields").hidden = !byToken;
}

// ---------------------------------------------------------------- picking an account

let moreAccountsLink = null;

// Straight after sign-in: every account the caller's roles reach (GET api/accounts), nothing
// to type; a subscription id and a resource group narrow the list to that group's.
function openAccountPicker() {
  generation += 1;
  stopStream();
  closeLog();
  resetAccountData();
  showView("account");
  $("subscription-id").value = "";
  $("resource-group").value = "";
  $("account-list").replaceChildren();
  $("more-accounts").hidden = true;
  listAccounts();
}

async function listAccounts({ more = false } = {}) {
  clearMessages();
  const subscription = $("subscription-id").value.trim();
  const resourceGroup = $("resource-group").value.trim();
  if (!subscription !== !resourceGroup) {
    showError("Enter a subscription id and a resource group, or neither to see every account you may use.");
    return;
  }
  const gen = generation;
  const button = more ? $("more-accounts") : $("list-accounts");
  busy(button, true);
  try {
    const url = more
      ? pageUrl(moreAccountsLink)
      : subscription
        ? serviceUrl(
            `api/subscriptions/${encodeURIComponent(subscription)}/resourceGroups/${encodeURIComponent(resourceGroup)}/accounts`,
            { count: PAGE_SIZE },
          )
        : serviceUrl("api/accounts", { count: PAGE_SIZE });
    const page = await getJson(url);
    if (gen !== generation) return;
    if (!more) $("account-list").replaceChildren();
    for (const account of page.value) $("account-list").append(accountItem(account));
    moreAccountsLink = page.nextLink || null;
    $("more-accounts").hidden = !moreAccountsLink;
    if (!more && page.value.length === 0) {
      showNotice(
        subscription
          ? "This resource group has no accounts."
          : "Your roles reach no account yet: create one, or ask an Owner for a role on one.",
      );
    }
    $("account-list").querySelector("button")?.focus();
  } catch (error) {
    reportFailure("Could not list the accounts", error);
  } finally {
    busy(button, false);
  }
}

function accountItem(account) {
  const item = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.dataset.account = account.name;
  const name = document.createElement("span");
  name.textContent = account.name;
  const where = {
    subscription: account.properties.subscriptionId,
    resourceGroup: account.properties.resourceGroup,
    account: account.name,
  };
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = [`${where.subscription} / ${where.resourceGroup}`, account.location, account.sku?.name]
    .filter(Boolean)
    .join(" · ");
  button.append(name, meta);
  button.addEventListener("click", () => openDashboard(where));
  item.append(button);
  return item;
}

// ---------------------------------------------------------------- the dashboard

const images = new Map(); // Id → the newest we know of the image
const imageRows = new Map(); // Id → its <tr>
let moreImagesLink = null;
const tables = {
  models: {
    path: "models",
    loaded: false,
    next: null,
    row: (m) => [cell(m.name), cell(m.version), cell((m.tags || []).join(", ")), cell(formatTime(m.createdAt))],
  },
  manifests: {
    path: "manifests",
    loaded: false,
    next: null,
    row: (m) => [cell(m.name), cell(m.version), cell(formatTime(m.CreatedTime))],
  },
};

function resetAccountData() {
  images.clear();
  imageRows.clear();
  moreImagesLink = null;
  $("images-body").replaceChildren();
  $("images-empty").hidden = true;
  $("more-images").hidden = true;
  for (const [kind, table] of Object.entries(tables)) {
    table.loaded = false;
    table.next = null;
    $(`${kind}-body`).replaceChildren();
    $(`${kind}-empty`).hidden = true;
    $(`more-${kind}`).hidden = true;
  }
  resetServices();
}

function openDashboard(next) {
  clearMessages();
  generation += 1;
  stopStream();
  closeLog();
  resetAccountData();
  place = next;
  sessionStorage.setItem(PLACE_KEY, JSON.stringify(place));
  showView("dashboard");
  selectTab("images");
  startStream();
  probeServices();
}

function selectTab(name) {
  for (const kind of TABS) {
    const tab = $(`tab-${kind}`);
    const selected = kind === name;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    $(`panel-${kind}`).hidden = !selected;
  }
  if (tables[name] && !tables[name].loaded) loadTable(name);
  if (name === "services") startServicePolling();
  else stopServicePolling();
}

function onTabKey(event) {
  const order = TABS.filter((kind) => !$(`tab-${kind}`).hidden);
  const at = order.indexOf(event.currentTarget.id.replace("tab-", ""));
  const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
  if (step === undefined) return;
  event.preventDefault();
  const name = order[(at + step + order.length) % order.length];
  selectTab(name);
  $(`tab-${name}`).focus();
}

async function loadTable(kind, { more = false } = {}) {
  const table = tables[kind];
  const gen = generation;
  const button = more ? $(`more-${kind}`) : $(`refresh-${kind}`);
  busy(button, true);
  try {
    const page = await getJson(more ? pageUrl(table.next) : accountUrl(table.path, { count: PAGE_SIZE }));
    if (gen !== generation) return;
    const body = $(`${kind}-body`);
    if (!more) body.replaceChildren();
    for (const item of page.value) {
      const tr = document.createElement("tr");
      tr.append(...table.row(item));
      body.append(tr);
    }
    table.loaded = true;
    table.next = page.nextLink || null;
    $(`more-${kind}`).hidden = !table.next;
    $(`${kind}-empty`).hidden = body.children.length > 0;
  } catch (error) {
    reportFailure(`Could not list the ${kind}`, error);
  } finally {
    busy(button, false);
  }
}

// ---------------------------------------------------------------- images

function rank(state) {
  return STATE_RANK[state] ?? -1;
}

/** Merge what we learnt of an image; a build only moves forward, so an older answer never
 * takes a state back (a list fetched just before an event may arrive just after it). */
function mergeImage(incoming) {
  const current = images.get(incoming.Id);
  if (!current) {
    images.set(incoming.Id, { ...incoming });
    return;
  }
  const merged = { ...current };
  for (const [key, value] of Object.entries(incoming)) if (value !== undefined) merged[key] = value;
  if (rank(incoming.CreationState) < rank(current.CreationState)) {
    for (const key of ["CreationState", "ImageLocation", "Digest", "Error", "SmokeTest"]) merged[key] = current[key];
  }
  images.set(incoming.Id, merged);
}

function compareImages(a, b) {
  // The API's order: by name, newest version first.
  if (a.Name !== b.Name) return a.Name < b.Name ? -1 : 1;
  return (b.Version ?? 0) - (a.Version ?? 0);
}

function imageRow(id) {
  const tr = document.createElement("tr");
  tr.dataset.imageId = id;
  const open = document.createElement("button");
  open.type = "button";
  open.className = "open-log";
  const state = document.createElement("span");
  state.className = "state";
  const smoke = document.createElement("small");
  smoke.className = "smoke-test";
  const stateCell = cell(state);
  stateCell.append(smoke);
  tr.append(cell(open), cell(""), stateCell, cell(""), cell("", "mono"));
  return tr;
}

function updateImageRow(tr, image) {
  const [nameCell, versionCell, stateCell, createdCell, whereCell] = tr.children;
  const open = nameCell.firstChild;
  if (open.textContent !== image.Name) open.textContent = image.Name;
  open.setAttribute("aria-label", `Open the build log of ${image.Name} version ${image.Version}`);
  if (versionCell.textContent !== String(image.Version)) versionCell.textContent = image.Version;
  const state = stateCell.firstChild;
  if (state.dataset.state !== image.CreationState) {
    state.dataset.state = image.CreationState;
    state.textContent = image.CreationState;
  }
  // Succeeded without ever being started says so: no engine could run its smoke test.
  const smoke = state.nextSibling;
  const skipped = image.SmokeTest?.result === "Skipped";
  const smokeText = skipped ? `Smoke test skipped: ${image.SmokeTest.reason || "no reason given"}` : "";
  if (smoke.textContent !== smokeText) smoke.textContent = smokeText;
  if (image.CreatedTime && createdCell.firstChild?.dateTime !== image.CreatedTime) {
    createdCell.replaceChildren(formatTime(image.CreatedTime));
  }
  const where = image.Error ? `${image.Error.code}: ${image.Error.message}` : image.ImageLocation || "";
  if (whereCell.textContent !== where) whereCell.textContent = where;
  whereCell.classList.toggle("err-text", Boolean(image.Error));
  tr.classList.toggle("selected", logView?.imageId === image.Id);
}

/** Update the table in place (rows keyed by image id), so a state change touches one cell. */
function renderImages() {
  const body = $("images-body");
  const ordered = [...images.values()].sort(compareImages);
  ordered.forEach((image, index) => {
    let tr = imageRows.get(image.Id);
    if (!tr) {
      tr = imageRow(image.Id);
      imageRows.set(image.Id, tr);
    }
    updateImageRow(tr, image);
    if (body.children[index] !== tr) body.insertBefore(tr, body.children[index] || null);
  });
  $("images-empty").hidden = images.size > 0;
}

async function loadImages({ more = false, reset = false } = {}) {
  const gen = generation;
  const button = more ? $("more-images") : $("refresh-images");
  busy(button, true);
  try {
    const page = await getJson(more ? pageUrl(moreImagesLink) : accountUrl("images", { count: PAGE_SIZE }));
    if (gen !== generation) return;
    if (reset) {
      // Keep what events told us since the request left; drop what is gone.
      const listed = new Set(page.value.map((image) => image.Id));
      for (const id of [...images.keys()]) {
        if (!listed.has(id) && images.get(id).listed) {
          images.delete(id);
          imageRows.get(id)?.remove();
          imageRows.delete(id);
        }
      }
    }
    for (const image of page.value) mergeImage({ ...image, listed: true });
    moreImagesLink = page.nextLink || null;
    $("more-images").hidden = !moreImagesLink;
    renderImages();
    refreshLogStatus();
  } catch (error) {
    reportFailure("Could not list the images", error);
  } finally {
    busy(button, false);
  }
}

async function loadImage(id) {
  // An image first heard of from the stream: fetch the rest (its creation time).
  const gen = generation;
  try {
    const image = await getJson(accountUrl(`images/${encodeURIComponent(id)}`));
    if (gen !== generation) return;
    mergeImage({ ...image, listed: true });
    renderImages();
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) return; // deleted meanwhile
    reportFailure("Could not read an image", error);
  }
}

// ---------------------------------------------------------------- web services (preview)

// The tab is shown only where the service serves web services (MMS_WEB_SERVICES_PREVIEW):
// elsewhere the list's route does not exist and answers 404 `NotFound` (an account that is
// gone answers `AccountNotFound`). The list has no event stream: it is polled every few
// seconds while the tab is open, with If-None-Match, so an unchanged list costs a bodiless
// 304. Scoring keys are never asked for here.

const svc = {
  list: [], // the services as last listed, in the API's order (by name)
  rows: new Map(), // id → its <tr>
  etag: null,
  poll: null, // {timer}: the running poll loop, replaced when the tab is opened again
  detail: null, // {id, controller, operation, factsKey}
  imageLabels: new Map(), // image id → "name:version" of an image the Images list lacks (null: asking)
};

function resetServices() {
  stopServicePolling();
  closeServiceDetail();
  svc.list = [];
  svc.rows.clear();
  svc.etag = null;
  svc.imageLabels.clear();
  $("tab-services").hidden = true;
  $("services-body").replaceChildren();
  $("services-empty").hidden = true;
  $("services-status").textContent = "";
}

/** The account's services ({page, etag}), or null when unchanged since `svc.etag`. */
async function fetchServices() {
  const headers = { Accept: "application/json" };
  if (svc.etag) headers["If-None-Match"] = svc.etag;
  // no-store: the browser's cache stays out of it, so its 304 reaches this code as it is.
  const response = await request(accountUrl("services"), { headers, cache: "no-store" });
  if (response.status === 304) return null;
  if (!response.ok) throw await errorOf(response);
  return { page: await response.json(), etag: response.headers.get("ETag") };
}

/** Once per account: is there a services list? Its first answer fills the table. */
async function probeServices() {
  const gen = generation;
  try {
    const answer = await fetchServices();
    if (gen !== generation) return;
    if (answer) applyServices(answer);
  } catch (error) {
    if (gen !== generation || !(error instanceof ApiError)) return;
    if (error.status === 404 && error.code === "NotFound") return; // no such route: no web services here
    // Any other answer comes from the route itself: the tab shows the error when opened.
  }
  $("tab-services").hidden = false;
}

async function loadServices({ button = null } = {}) {
  const gen = generation;
  if (button) busy(button, true);
  try {
    const answer = await fetchServices();
    if (gen !== generation) return;
    if (answer) applyServices(answer);
    else renderServices(); // unchanged; an image's name may have arrived meanwhile
  } catch (error) {
    reportFailure("Could not list the web services", error);
  } finally {
    if (button) busy(button, false);
  }
  if (gen === generation && svc.detail) await refreshServiceDetail(svc.detail);
}

function applyServices({ page, etag }) {
  svc.etag = etag;
  svc.list = page.value;
  const listed = new Set(svc.list.map((service) => service.id));
  for (const [id, tr] of [...svc.rows]) {
    if (!listed.has(id)) {
      tr.remove();
      svc.rows.delete(id);
    }
  }
  renderServices();
  if (svc.detail && !listed.has(svc.detail.id)) closeServiceDetail();
}

function renderServices() {
  const body = $("services-body");
  svc.list.forEach((service, index) => {
    let tr = svc.rows.get(service.id);
    if (!tr) {
      tr = serviceRow(service.id);
      svc.rows.set(service.id, tr);
    }
    updateServiceRow(tr, service);
    if (body.children[index] !== tr) body.insertBefore(tr, body.children[index] || null);
  });
  $("services-empty").hidden = svc.list.length > 0;
  const shown = svc.detail && svc.list.find((service) => service.id === svc.detail.id);
  if (shown) renderServiceFacts(shown);
}

function startServicePolling() {
  if (svc.poll) return;
  const gen = generation;
  const poll = { timer: null };
  svc.poll = poll;
  $("services-status").textContent = `Refreshing every ${SERVICES_POLL_MS / 1000} s`;
  const tick = async () => {
    if (svc.poll !== poll || gen !== generation) return;
    await loadServices();
    if (svc.poll === poll && gen === generation) poll.timer = setTimeout(tick, SERVICES_POLL_MS);
  };
  tick();
}

function stopServicePolling() {
  if (!svc.poll) return;
  clearTimeout(svc.poll.timer);
  svc.poll = null;
}

/** A copyable URI (the code and a Copy button), or a muted dash when there is none yet. */
function uriNode(uri, what, none) {
  const box = document.createElement("div");
  box.className = "uri";
  if (!uri) {
    const dash = document.createElement("span");
    dash.className = "none";
    dash.textContent = none;
    box.append(dash);
    return box;
  }
  const code = document.createElement("code");
  code.textContent = uri;
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy-uri";
  copy.dataset.uri = uri;
  copy.textContent = "Copy";
  copy.setAttribute("aria-label", `Copy the ${what}`);
  box.append(code, copy);
  return box;
}

async function copyUri(button) {
  try {
    await navigator.clipboard.writeText(button.dataset.uri);
    button.textContent = "Copied";
    setTimeout(() => {
      button.textContent = "Copy";
    }, 1500);
  } catch {
    // No clipboard (a page not served over https or from localhost, or refused): select it.
    const range = document.createRange();
    range.selectNodeContents(button.previousElementSibling);
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    showNotice("The URI is selected: press Ctrl+C to copy it.");
  }
}

function imageLabel(id) {
  const image = images.get(id);
  if (image) return `${image.Name}:${image.Version}`;
  if (!svc.imageLabels.has(id)) lookUpImage(id);
  return svc.imageLabels.get(id) || id;
}

async function lookUpImage(id) {
  // An image the Images list has not (yet) brought: its name and version, once.
  svc.imageLabels.set(id, null);
  const gen = generation;
  try {
    const image = await getJson(accountUrl(`images/${encodeURIComponent(id)}`));
    if (gen !== generation) return;
    svc.imageLabels.set(id, `${image.Name}:${image.Version}`);
    renderServices();
  } catch {
    // Deleted, or unreadable: the id stays in its place.
  }
}

async function openImage(id) {
  selectTab("images");
  if (!images.has(id)) await loadImage(id);
  if (images.has(id)) openLog(id);
}

function serviceRow(id) {
  const tr = document.createElement("tr");
  tr.dataset.serviceId = id;
  const open = document.createElement("button");
  open.type = "button";
  open.className = "open-log open-service";
  const state = document.createElement("span");
  state.className = "state";
  const error = document.createElement("small");
  error.className = "service-error err-text";
  const stateCell = cell(state);
  stateCell.append(error);
  const image = document.createElement("button");
  image.type = "button";
  image.className = "open-log open-image";
  tr.append(cell(open), stateCell, cell(""), cell(""), cell(image), cell(""));
  return tr;
}

function errorText(service) {
  return service.error ? `${service.error.code}: ${service.error.message}` : "";
}

function updateServiceRow(tr, service) {
  const [nameCell, stateCell, uriCell, replicasCell, imageCell, computeCell] = tr.children;
  const open = nameCell.firstChild;
  if (open.textContent !== service.name) open.textContent = service.name;
  open.setAttribute("aria-label", `Show the details of ${service.name}`);
  const state = stateCell.firstChild;
  if (state.dataset.state !== service.state) {
    state.dataset.state = service.state;
    state.textContent = service.state;
  }
  const error = state.nextSibling;
  if (error.textContent !== errorText(service)) error.textContent = errorText(service);
  // Rebuilt only when it changes, so a "Copied" being shown is left alone.
  const uri = service.scoringUri || "";
  if (uriCell.dataset.uri !== uri || !uriCell.firstChild) {
    uriCell.dataset.uri = uri;
    uriCell.replaceChildren(uriNode(uri, `scoring URI of ${service.name}`, "not serving yet"));
  }
  const status = service.deploymentStatus;
  const replicas = `${status.readyReplicas}/${status.desiredReplicas}`;
  if (replicasCell.textContent !== replicas) replicasCell.textContent = replicas;
  const image = imageCell.firstChild;
  const label = imageLabel(service.imageId);
  if (image.textContent !== label) image.textContent = label;
  image.dataset.imageId = service.imageId;
  image.setAttribute("aria-label", `Open the build log of image ${label}`);
  const compute = `${service.computeName} (${service.computeType})`;
  if (computeCell.textContent !== compute) computeCell.textContent = compute;
  tr.classList.toggle("selected", svc.detail?.id === service.id);
}

// The detail view: every field but the keys, the operation, and the replicas' recent logs
// (GET .../logs, re-read at each poll while it is open).

function openServiceDetail(id) {
  closeServiceDetail();
  const service = svc.list.find((s) => s.id === id);
  if (!service) return;
  svc.detail = { id, controller: new AbortController(), operation: null, factsKey: null };
  $("service-title").textContent = `Service: ${service.name}`;
  $("service-status").textContent = "";
  $("service-logs").textContent = "";
  $("service-panel").hidden = false;
  renderServices();
  refreshServiceDetail(svc.detail);
  $("service-panel").scrollIntoView({ block: "nearest" });
}

function closeServiceDetail() {
  if (!svc.detail) return;
  svc.detail.controller.abort();
  svc.detail = null;
  $("service-panel").hidden = true;
  $("service-facts").replaceChildren();
  $("service-logs").textContent = "";
  for (const tr of svc.rows.values()) tr.classList.remove("selected");
}

function fact(term, ...content) {
  const dt = document.createElement("dt");
  dt.textContent = term;
  const dd = document.createElement("dd");
  for (const part of content) dd.append(part instanceof Node ? part : document.createTextNode(part ?? ""));
  return [dt, dd];
}

function renderServiceFacts(service) {
  const view = svc.detail;
  const operation = view.operation;
  const key = JSON.stringify([service, operation, imageLabel(service.imageId)]);
  if (view.factsKey === key) return; // unchanged: leave a selection or a "Copied" alone
  view.factsKey = key;
  const state = document.createElement("span");
  state.className = "state";
  state.dataset.state = service.state;
  state.textContent = service.state;
  const error = document.createElement("span");
  error.className = "err-text";
  error.textContent = service.error ? ` ${errorText(service)}` : "";
  const digest = document.createElement("span");
  digest.className = "mono";
  digest.textContent = service.imageDigest ? ` ${service.imageDigest}` : "";
  const status = service.deploymentStatus;
  const resources = service.containerResourceRequirements;
  const scaling = service.autoScaler?.autoscaleEnabled
    ? `, autoscaled ${service.autoScaler.minReplicas}–${service.autoScaler.maxReplicas}`
    : "";
  let operationText = "none";
  if (service.operationId) {
    operationText = operation
      ? `${operation.state}${operation.error ? ` (${operation.error.code}: ${operation.error.message})` : ""}`
      : "…";
  }
  const id = document.createElement("span");
  id.className = "mono";
  id.textContent = service.id;
  $("service-facts").replaceChildren(
    ...fact("Id", id),
    ...fact("State", state, error),
    ...(service.description ? fact("Description", service.description) : []),
    ...fact("Scoring URI", uriNode(service.scoringUri, `scoring URI of ${service.name}`, "not serving yet")),
    ...fact("Swagger URI", uriNode(service.swaggerUri, `swagger URI of ${service.name}`, "not serving yet")),
    ...fact("Replicas", `${status.readyReplicas} ready of ${status.desiredReplicas}${scaling}`),
    ...fact("Image", imageLabel(service.imageId), digest),
    ...fact("Compute", `${service.computeName} (${service.computeType})`),
    ...fact("Resources", `${resources.cpu} CPU, ${resources.memoryInGB} GB per replica`),
    ...fact("Key auth", service.authEnabled ? "on (keys are not shown here)" : "off"),
    ...fact("Operation", operationText),
    ...fact("Created", formatTime(service.createdTime)),
    ...fact("Updated", formatTime(service.updatedTime)),
  );
}

async function refreshServiceDetail(view) {
  const service = svc.list.find((s) => s.id === view.id);
  if (!service) return;
  const { signal } = view.controller;
  try {
    if (service.operationId && (view.operation?.id !== service.operationId || view.operation.state === "Running")) {
      const operation = await getJson(accountUrl(`operations/${encodeURIComponent(service.operationId)}`), signal);
      if (view !== svc.detail) return;
      view.operation = operation;
      renderServices();
    }
    const response = await request(
      accountUrl(`services/${encodeURIComponent(view.id)}/logs`, { tail: SERVICE_LOG_LINES }),
      { headers: { Accept: "text/plain" }, signal, cache: "no-store" },
    );
    if (!response.ok) throw await errorOf(response);
    const text = await response.text();
    if (view !== svc.detail) return;
    // The tenant's code printed it: text only, never markup.
    const pre = $("service-logs");
    if (pre.textContent !== text) {
      const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.textContent = text;
      if (atBottom) pre.scrollTop = pre.scrollHeight;
    }
    const lines = text.split("\n").filter(Boolean).length;
    $("service-status").textContent = lines ? `${lines} recent log lines (${SERVICE_LOG_LINES} at most)` : "no log lines yet";
  } catch (error) {
    if (view !== svc.detail) return;
    reportFailure("Could not read the service", error);
  }
}

// ---------------------------------------------------------------- the event stream

let stream = null; // {controller, lastEventId, retryMs, stopped}

function setLive(mode, text) {
  const live = $("live");
  live.dataset.live = mode;
  live.textContent = text;
}

function startStream() {
  stopStream();
  stream = { controller: null, lastEventId: null, retryMs: null, stopped: false, pollTimer: null };
  setLive("off", "Connecting…");
  runStream(stream);
}

function stopStream() {
  if (!stream) return;
  stream.stopped = true;
  stream.controller?.abort();
  clearTimeout(stream.pollTimer);
  stream = null;
}

/** Keep one connection to .../images/events open: open it, list the images on `ready`, apply
 * each `image` event, and reconnect with backoff and Last-Event-ID when it drops. */
async function runStream(s) {
  let failures = 0;
  while (!s.stopped) {
    s.controller = new AbortController();
    try {
      const headers = { Accept: "text/event-stream" };
      if (s.lastEventId !== null) headers["Last-Event-ID"] = s.lastEventId;
      const response = await request(accountUrl("images/events"), {
        headers,
        signal: s.controller.signal,
        cache: "no-store",
      });
      if ([404, 405, 501].includes(response.status)) {
        // A service without the event stream: poll the list instead.
        startPolling(s);
        return;
      }
      if (!response.ok) throw await errorOf(response);
      if (!response.body || !(response.headers.get("content-type") || "").startsWith("text/event-stream")) {
        throw new ApiError(response.status, "the event stream answered something else");
      }
      setLive("on", "Live");
      await readEvents(response.body, s, () => {
        failures = 0;
      });
    } catch (error) {
      if (s.stopped || error instanceof SignedOut) return;
      if (error instanceof ApiError && error.code === "InvalidLastEventId" && s.lastEventId !== null) {
        // An id this service no longer takes (its secret key changed): start afresh, and the
        // `ready` event lists the images again, so nothing is missed.
        s.lastEventId = null;
        continue;
      }
      if (error instanceof ApiError && error.status >= 400 && error.status < 500 && ![408, 429].includes(error.status)) {
        setLive("off", "Not live");
        showError(`Live updates stopped: ${error.message}`);
        return;
      }
    }
    if (s.stopped) return;
    failures += 1;
    setLive("off", "Reconnecting…");
    const base = s.retryMs ?? 1000;
    const wait = Math.min(MAX_BACKOFF_MS, base * 2 ** Math.min(failures - 1, 6));
    await sleep(wait * (0.8 + Math.random() * 0.4));
  }
}

async function readEvents(body, s, onFrame) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let frame = { event: "", data: [], id: undefined };
  let idle = null;
  const arm = () => {
    clearTimeout(idle);
    idle = setTimeout(() => s.controller.abort(), STREAM_IDLE_MS);
  };

  const dispatch = () => {
    if (frame.id !== undefined) s.lastEventId = frame.id;
    const { event, data } = frame;
    frame = { event: "", data: [], id: undefined };
    if (data.length === 0) return;
    onFrame();
    handleEvent(event || "message", data.join("\n"), s);
  };

  const line = (text) => {
    if (text === "") return dispatch();
    if (text[0] === ":") return undefined; // a comment: the keep-alive
    const colon = text.indexOf(":");
    const field = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? "" : text.slice(colon + 1);
    if (value[0] === " ") value = value.slice(1);
    if (field === "event") frame.event = value;
    else if (field === "data") frame.data.push(value);
    else if (field === "id" && !value.includes("\0")) frame.id = value;
    else if (field === "retry" && /^\d+$/.test(value)) s.retryMs = Number(value);
    return undefined;
  };

  arm();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done || s.stopped) return;
      arm();
      buffer += decoder.decode(value, { stream: true });
      let start = 0;
      for (let i = 0; i < buffer.length; i += 1) {
        const ch = buffer[i];
        if (ch !== "\n" && ch !== "\r") continue;
        if (ch === "\r" && i + 1 === buffer.length) break; // maybe the first half of \r\n
        line(buffer.slice(start, i));
        if (ch === "\r" && buffer[i + 1] === "\n") i += 1;
        start = i + 1;
      }
      buffer = buffer.slice(start);
    }
  } finally {
    clearTimeout(idle);
    reader.cancel().catch(() => {});
  }
}

function handleEvent(type, data, s) {
  if (s.stopped) return;
  if (type === "ready") {
    // The stream is open, so no change can slip between the list and the events.
    loadImages();
    return;
  }
  if (type !== "image") return;
  let event;
  try {
    event = JSON.parse(data);
  } catch {
    return;
  }
  const image = event?.image;
  if (!image?.Id) return;
  const ours = `/subscriptions/${place.subscription}/resourceGroups/${place.resourceGroup}/accounts/${place.account}`;
  if (event.account && ours.toLowerCase() !== String(event.account).toLowerCase()) return;
  const known = images.has(image.Id);
  mergeImage(image);
  renderImages();
  refreshLogStatus();
  if (!known || !images.get(image.Id).CreatedTime) loadImage(image.Id);
}

function startPolling(s) {
  setLive("poll", `Refreshing every ${POLL_FALLBACK_MS / 1000} s`);
  const tick = async () => {
    if (s.stopped) return;
    await loadImages({ reset: true });
    if (!s.stopped) s.pollTimer = setTimeout(tick, POLL_FALLBACK_MS);
  };
  tick();
}

// ---------------------------------------------------------------- the build log

let logView = null; // {imageId, offset, decoder, controller, timer, stopped, complete}

function openLog(id) {
  closeLog();
  const image = images.get(id);
  if (!image) return;
  logView = { imageId: id, offset: 0, decoder: new TextDecoder(), controller: new AbortController(), timer: null, stopped: false, complete: false };
  $("log-title").textContent = `Build log: ${image.Name}:${image.Version}`;
  $("log-text").replaceChildren();
  $("log-panel").hidden = false;
  for (const [rowId, tr] of imageRows) tr.classList.toggle("selected", rowId === id);
  refreshLogStatus();
  pollLog(logView);
  $("log-panel").scrollIntoView({ block: "nearest" });
}

function closeLog() {
  if (!logView) return;
  logView.stopped = true;
  logView.controller.abort();
  clearTimeout(logView.timer);
  logView = null;
  $("log-panel").hidden = true;
  $("log-text").replaceChildren();
  for (const tr of imageRows.values()) tr.classList.remove("selected");
}

function refreshLogStatus() {
  if (!logView) return;
  const state = images.get(logView.imageId)?.CreationState || "";
  // "complete" only once the log has been read after the state became final.
  $("log-status").textContent = logView.complete ? `${state}: complete` : `${state}: following…`;
}

/** Fetch what is new every second while the build runs; once its state is final, fetch a
 * last time (the log is written before the state) and stop. */
async function pollLog(view) {
  if (view.stopped) return;
  const finalBefore = FINAL_STATES.has(images.get(view.imageId)?.CreationState);
  try {
    await fetchLogTail(view);
  } catch (error) {
    if (view.stopped || error instanceof SignedOut || error?.name === "AbortError") return;
    reportFailure("Could not read the build log", error);
    if (error instanceof ApiError && error.status === 404) return;
  }
  if (view.stopped) return;
  view.complete = finalBefore;
  refreshLogStatus();
  if (finalBefore) return;
  view.timer = setTimeout(() => pollLog(view), LOG_POLL_MS);
}

async function fetchLogTail(view) {
  // Only what we have not shown: 206 with it, 416 when there is nothing new, or 200 with the
  // whole log from a service that ignores Range.
  const headers = { Accept: "text/plain", Range: `bytes=${view.offset}-` };
  const response = await request(accountUrl(`images/${encodeURIComponent(view.imageId)}/log`), {
    headers,
    signal: view.controller.signal,
    cache: "no-store",
  });
  if (response.status === 416) return; // nothing new yet
  if (!response.ok) throw await errorOf(response);
  const bytes = new Uint8Array(await response.arrayBuffer());
  if (view.stopped) return;
  let start = 0; // where these bytes sit in the log
  if (response.status === 206) {
    const range = /^bytes (\d+)-\d+\/(?:\d+|\*)$/.exec(response.headers.get("Content-Range") || "");
    start = range ? Number(range[1]) : view.offset;
  }
  if (start > view.offset || start + bytes.length < view.offset) {
    // A gap or a shorter log than we have shown: start over from the whole log.
    view.offset = 0;
    view.decoder = new TextDecoder();
    $("log-text").replaceChildren();
    if (start > 0) return;
  }
  const fresh = bytes.subarray(view.offset - start);
  if (fresh.length === 0) return;
  view.offset += fresh.length;
  appendLog(view.decoder.decode(fresh, { stream: true }));
}

function appendLog(text) {
  if (!text) return;
  const pre = $("log-text");
  const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  pre.append(document.createTextNode(text));
  if (atBottom) pre.scrollTop = pre.scrollHeight;
}

// ---------------------------------------------------------------- wiring

function restore() {
  try {
    place = JSON.parse(sessionStorage.getItem(PLACE_KEY) || "null");
    const saved = JSON.parse(sessionStorage.getItem(SESSION_KEY) || "null");
    if (saved?.token && (!saved.expiresAt || saved.expiresAt > Date.now())) {
      startSession(saved);
      if (place?.account) openDashboard(place);
      else openAccountPicker();
      return;
    }
  } catch {
    sessionStorage.removeItem(SESSION_KEY);
  }
  sessionStorage.removeItem(SESSION_KEY);
  showView("signin");
}

$("signin-form").addEventListener("submit", onSignIn);
for (const radio of document.querySelectorAll('input[name="method"]')) radio.addEventListener("change", onMethodChange);
$("sign-out").addEventListener("click", () => signOut({ notice: "Signed out." }));
$("change-account").addEventListener("click", openAccountPicker);
$("account-form").addEventListener("submit", (event) => {
  event.preventDefault();
  listAccounts();
});
$("more-accounts").addEventListener("click", () => listAccounts({ more: true }));
for (const kind of TABS) {
  $(`tab-${kind}`).addEventListener("click", () => selectTab(kind));
  $(`tab-${kind}`).addEventListener("keydown", onTabKey);
}
$("refresh-images").addEventListener("click", () => loadImages({ reset: true }));
$("more-images").addEventListener("click", () => loadImages({ more: true }));
for (const kind of Object.keys(tables)) {
  $(`refresh-${kind}`).addEventListener("click", () => loadTable(kind));
  $(`more-${kind}`).addEventListener("click", () => loadTable(kind, { more: true }));
}
$("images-body").addEventListener("click", (event) => {
  const tr = event.target.closest("tr[data-image-id]");
  if (tr) openLog(tr.dataset.imageId);
});
$("log-close").addEventListener("click", closeLog);
$("refresh-services").addEventListener("click", (event) => loadServices({ button: event.currentTarget }));
$("panel-services").addEventListener("click", (event) => {
  const button = event.target.closest("button");
  if (button?.classList.contains("copy-uri")) copyUri(button);
  else if (button?.classList.contains("open-service")) openServiceDetail(button.closest("tr").dataset.serviceId);
  else if (button?.classList.contains("open-image")) openImage(button.dataset.imageId);
});
$("service-close").addEventListener("click", closeServiceDetail);
onMethodChange();
restore();
