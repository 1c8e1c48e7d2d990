// The adapter a request is for, as nginx's njs module sees it: the X-Adapter-Id header, else the id
// in an /v1/adapters/{id} path, else the JSON body's "adapter_id", else its "model" unless that is
// the base model ($lora_base_model). Empty: the request names no adapter.
//
// The body is parsed as JSON (not matched with a regex), so key order, whitespace, escapes and a
// "model" key inside a message's text can't fool it. It is in memory because the inference
// locations set client_body_buffer_size to client_max_body_size (see nginx.conf).

const ID = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
const PATH = /^\/v1\/adapters\/([A-Za-z0-9][A-Za-z0-9._-]{0,127})$/;

function fromBody(r) {
    let body;
    try {
        body = JSON.parse(r.requestText || "");
    } catch (e) {
        return "";  // not JSON (the server will say why), or no body
    }
    if (body === null || typeof body !== "object") {
        return "";
    }
    if (typeof body.adapter_id === "string" && ID.test(body.adapter_id)) {
        return body.adapter_id;
    }
    if (typeof body.model === "string" && ID.test(body.model) && body.model !== r.variables.lora_base_model) {
        return body.model;
    }
    return "";
}

function adapterKey(r) {
    const header = r.headersIn["X-Adapter-Id"];
    if (header && ID.test(header)) {
        return header;
    }
    const path = PATH.exec(r.uri);
    if (path) {
        return path[1];
    }
    return r.method === "POST" ? fromBody(r) : "";
}

// js_content of the inference locations: the body has been read; hand the request to the upstream
// that fits (consistent hash on the adapter, or least connections), body and all.
function route(r) {
    r.internalRedirect(adapterKey(r) ? "@by_adapter" : "@any");
}

export default {adapterKey, route};
