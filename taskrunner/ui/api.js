// API calls of the web UI. With API_TOKEN set on the server, the first 401 opens the token
// dialog once (concurrent calls wait for the same answer); the token is kept in
// sessionStorage (localStorage when "remember" is ticked) and sent as a bearer header,
// never in a URL.

const KEY = "taskrunner.token";
let token = sessionStorage.getItem(KEY) || localStorage.getItem(KEY) || "";
let asking = null; // the pending token prompt, shared by every call that got a 401

export class ApiError extends Error {
  constructor(status, body) {
    const details = body && body.details ? `: ${body.details.join("; ")}` : "";
    super(`${(body && body.error) || `HTTP ${status}`}${details}`);
    this.status = status;
    this.body = body;
  }
}

function askToken(refused) {
  if (asking) return asking;
  const dialog = document.getElementById("token-dialog");
  const input = document.getElementById("token-input");
  document.getElementById("token-error").textContent = refused
    ? "That token was refused; try again." : "";
  input.value = "";
  asking = new Promise((resolve) => {
    dialog.addEventListener("close", function done() {
      dialog.removeEventListener("close", done);
      const value = input.value.trim();
      const remember = document.getElementById("token-remember").checked;
      sessionStorage.setItem(KEY, value);
      if (remember) localStorage.setItem(KEY, value);
      else localStorage.removeItem(KEY);
      asking = null;
      resolve(value);
    });
  });
  dialog.showModal();
  input.focus();
  return asking;
}

/** Call the API: `method` `path` with an optional JSON `body`; the decoded answer. */
export async function api(method, path, body) {
  for (;;) {
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = `Bearer ${token}`;
    const init = { method, headers };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const sent = token;
    const resp = await fetch(path, init);
    if (resp.status === 401) {
      // another call may have got a new token meanwhile: retry with it before asking
      token = token !== sent ? token : await askToken(Boolean(sent));
      continue;
    }
    const text = await resp.text();
    const data = text ? JSON.parse(text) : null;
    if (!resp.ok) throw new ApiError(resp.status, data);
    return data;
  }
}

export const get = (path) => api("GET", path);
