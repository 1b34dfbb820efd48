--- phi-lsp for Neovim: the phi-lsp language server on Python buffers, its Phi-1 suggestions as
--- ghost text (native `vim.lsp.inline_completion` on 0.12+, this plugin's own extmarks on
--- 0.10-0.11), accepted with <Tab>. `setup()` is optional: the defaults work when `phi-lsp` is on
--- PATH and the model is in $PHI_LSP_MODEL.
local M = {}

local has_011 = vim.fn.has('nvim-0.11') == 1

---@class phi_lsp.Config
M.defaults = {
  --- The server command.
  cmd = { 'phi-lsp', '--stdio' },
  filetypes = { 'python' },
  root_markers = { 'pyproject.toml', 'setup.py', 'setup.cfg', 'requirements.txt', '.git' },
  --- Server options, as the server names them: model, tokenizer, device, dtype, maxNewTokens,
  --- deadlineMs, contextTokens, completionMode, speculate, tokenHealing, automatic,
  --- alternatives. Sent as
  --- initializationOptions and as workspace/didChangeConfiguration settings under "phi-lsp".
  settings = {},
  --- 'auto' (native on 0.12+, else the plugin's), 'native', 'plugin', or false for none (the
  --- server then answers in the completion menu).
  inline = 'auto',
  --- Insert-mode key that accepts the ghost text (falls through to the key when there is none);
  --- false for no mapping (use require('phi_lsp').accept()).
  accept_key = '<Tab>',
  --- Insert-mode keys that accept the suggestion's next word and its next line (the rest stays
  --- shown); false for no mapping.
  accept_word_key = '<M-Right>',
  accept_line_key = '<M-C-Right>',
  --- Insert-mode key that asks for a suggestion now (an Invoked request: the way to ask when
  --- settings.automatic is false); false for no mapping.
  trigger_key = '<M-\\>',
  --- Insert-mode keys that show the next and the previous of the alternatives the server offers to
  --- an explicit request (settings.alternatives, 3 by default): pressed over a suggestion that came
  --- alone (as you typed), they ask explicitly first; false for no mapping.
  next_key = '<M-]>',
  prev_key = '<M-[>',
  --- Milliseconds between two phi-lsp/status requests of the statusline component (statusline()).
  status_refresh_ms = 1000,
  --- Plugin ghost text only: milliseconds after the last keystroke before asking.
  debounce_ms = 150,
}

--- Keys whose list values replace the default instead of merging index by index.
local list_keys = { cmd = true, filetypes = true, root_markers = true }

---@type phi_lsp.Config
M.config = vim.deepcopy(M.defaults)

--- Suggestions on or off (:PhiLsp enable/disable); the server keeps running either way.
M.enabled = true

--- Compatibility: 0.11 made client methods take `self` (`client:request`); 0.10 has closures.
local function call(client, method, ...)
  if has_011 then
    return client[method](client, ...)
  end
  return client[method](...)
end
M._call = call

---@param opts? phi_lsp.Config
function M.setup(opts)
  opts = opts or {}
  local config = vim.deepcopy(M.defaults)
  for key, value in pairs(opts) do
    if list_keys[key] or type(value) ~= 'table' or type(config[key]) ~= 'table' then
      config[key] = value
    else
      config[key] = vim.tbl_deep_extend('force', config[key], value)
    end
  end
  M.config = config
  if has_011 then
    vim.lsp.config('phi_lsp', M.lsp_config())
    vim.lsp.enable('phi_lsp', opts.autostart ~= false and vim.g.phi_lsp_autostart ~= false)
  end
  for _, client in ipairs(M.clients()) do
    client.settings = { ['phi-lsp'] = M.server_settings() }
    call(client, 'notify', 'workspace/didChangeConfiguration', { settings = client.settings })
  end
end

--- The server options; never an empty list, which the server would reject.
function M.server_settings()
  local settings = vim.deepcopy(M.config.settings or {})
  if next(settings) == nil then
    return vim.empty_dict()
  end
  return settings
end

--- Whether the client should declare inline completion (and so get ghost text rather than menu
--- items from the server's completionMode "auto").
local function wants_inline()
  return M.config.inline ~= false
end

--- The server's notification that the suggestion answered at a position has grown.
M.SUGGESTION_GREW = 'phi-lsp/suggestionGrew'

--- The client config: for `vim.lsp.config`/`vim.lsp.enable` on 0.11+, `vim.lsp.start` on 0.10.
function M.lsp_config()
  local capabilities = vim.lsp.protocol.make_client_capabilities()
  if wants_inline() then
    -- Neovim 0.12 declares this itself; 0.10-0.11 get it from this plugin's ghost text.
    capabilities.textDocument.inlineCompletion = capabilities.textDocument.inlineCompletion
      or { dynamicRegistration = false }
    -- Progressive suggestions: the server answers with the first line and then sends
    -- phi-lsp/suggestionGrew as the suggestion grows (handled below).
    capabilities.experimental = vim.tbl_extend('force', capabilities.experimental or {}, {
      phiLsp = { suggestionGrowth = true },
    })
  else
    capabilities.textDocument.inlineCompletion = nil
  end
  return {
    cmd = M.config.cmd,
    filetypes = M.config.filetypes,
    root_markers = M.config.root_markers,
    capabilities = capabilities,
    handlers = {
      [M.SUGGESTION_GREW] = function(...)
        return M.on_suggestion_grew(...)
      end,
    },
    settings = { ['phi-lsp'] = M.server_settings() },
    -- initializationOptions follow the final settings, however they were configured, so that the
    -- right model loads first rather than after a reload.
    before_init = function(params, config)
      local settings = config.settings and config.settings['phi-lsp']
      params.initializationOptions = settings or M.server_settings()
    end,
  }
end

--- Starts (or reuses) the client for a buffer; what the FileType autocmd does on 0.10.
function M.start(bufnr)
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  if vim.bo[bufnr].buftype ~= '' then
    return
  end
  local config = M.lsp_config()
  config.name = 'phi_lsp'
  config.root_dir = vim.fs.root(bufnr, config.root_markers)
  return vim.lsp.start(config, { bufnr = bufnr })
end

---@param bufnr? integer
---@return vim.lsp.Client[]
function M.clients(bufnr)
  return vim.lsp.get_clients({ name = 'phi_lsp', bufnr = bufnr })
end

--- Which ghost text a buffer gets.
function M.inline_kind()
  local inline = M.config.inline
  if inline == false then
    return nil
  end
  if inline == 'plugin' or not (vim.lsp.inline_completion and vim.lsp.inline_completion.enable) then
    return 'plugin'
  end
  return 'native'
end

--- Sets up ghost text and the accept key on a buffer the server attached to.
function M.on_attach(client, bufnr)
  local kind = M.inline_kind()
  if kind == 'native' then
    vim.lsp.inline_completion.enable(M.enabled, { bufnr = bufnr })
    -- Neovim may make the buffer's completor after this autocommand, and again when it is
    -- enabled anew: guarded then, and on entering insert mode.
    vim.schedule(function()
      M._guard_native(bufnr)
    end)
    vim.api.nvim_create_autocmd('InsertEnter', {
      group = vim.api.nvim_create_augroup('phi_lsp.native.' .. bufnr, { clear = true }),
      buffer = bufnr,
      callback = function()
        M._guard_native(bufnr)
      end,
    })
  elseif kind == 'plugin' then
    require('phi_lsp.ghost').attach(bufnr, client.id)
  else
    return
  end
  -- Each key falls through to itself when there is nothing to accept.
  local accepts = {
    { M.config.accept_key, nil, 'phi-lsp: accept the suggestion' },
    { M.config.accept_word_key, 'word', "phi-lsp: accept the suggestion's next word" },
    { M.config.accept_line_key, 'line', "phi-lsp: accept the suggestion's next line" },
  }
  for _, accept in ipairs(accepts) do
    local key, part, desc = accept[1], accept[2], accept[3]
    if key then
      vim.keymap.set('i', key, function()
        if M.accept(bufnr, part) then
          return ''
        end
        return key
      end, { buffer = bufnr, expr = true, desc = desc })
    end
  end
  local trigger = M.config.trigger_key
  if trigger then
    vim.keymap.set('i', trigger, function()
      M.trigger(bufnr)
    end, { buffer = bufnr, desc = 'phi-lsp: ask for a suggestion now' })
  end
  local cycles = {
    { M.config.next_key, 1, 'phi-lsp: the next alternative suggestion' },
    { M.config.prev_key, -1, 'phi-lsp: the previous alternative suggestion' },
  }
  for _, cycle in ipairs(cycles) do
    local key, delta, desc = cycle[1], cycle[2], cycle[3]
    if key then
      vim.keymap.set('i', key, function()
        M.cycle(bufnr, delta)
      end, { buffer = bufnr, desc = desc })
    end
  end
end

--- Asks 0.12's native inline completion again in a buffer, as typing would; the server answers
--- from the generation still running. Neovim has no public call for it: its completor's request
--- when it is there, else the autocommand through which typing asks (debounced).
--- 0.12's completor of a buffer (its current item, its request), from Neovim's internals: nil
--- when they are not as expected.
local function native_completor(bufnr)
  local ok, capability = pcall(require, 'vim.lsp._capability')
  local class = ok and type(capability.all) == 'table' and capability.all.inline_completion
  local completor = type(class) == 'table' and type(class.active) == 'table' and class.active[bufnr]
  return type(completor) == 'table' and completor or nil
end

local function refresh_native(bufnr)
  local completor = native_completor(bufnr)
  if completor and type(completor.request) == 'function' then
    completor:request(vim.lsp.protocol.InlineCompletionTriggerKind.Automatic)
    return
  end
  pcall(vim.api.nvim_exec_autocmds, 'CursorMovedI', {
    group = 'nvim.lsp.inline_completion:' .. bufnr,
    buffer = bufnr,
    modeline = false,
  })
end

--- Whether a `phi-lsp/suggestionGrew` still concerns what the user sees: the current buffer, at
--- the version of the request, in insert mode, with the cursor where the request was made. Returns
--- the buffer, row and byte column, or nil for a stale notification (the user moved or typed).
---@return integer?, integer?, integer?
local function growth_target(client, params)
  if type(params) ~= 'table' or type(params.text) ~= 'string' then
    return nil
  end
  local doc, pos = params.textDocument, params.position
  if type(doc) ~= 'table' or type(pos) ~= 'table' then
    return nil
  end
  local bufnr = vim.api.nvim_get_current_buf()
  if
    not client.attached_buffers[bufnr]
    or vim.uri_from_bufnr(bufnr) ~= doc.uri
    or vim.lsp.util.buf_versions[bufnr] ~= doc.version
    or vim.api.nvim_get_mode().mode:sub(1, 1) ~= 'i'
  then
    return nil
  end
  local cursor = vim.api.nvim_win_get_cursor(0)
  local row, col = cursor[1] - 1, cursor[2]
  local encoding = client.offset_encoding or 'utf-16'
  if row ~= pos.line or vim.lsp.util.character_offset(bufnr, row, col, encoding) ~= pos.character then
    return nil
  end
  return bufnr, row, col
end

--- Handler of `phi-lsp/suggestionGrew` (sent after each new line of a suggestion and when its
--- generation ends): refreshes the ghost text where the notification still matches, ignores it
--- where it does not.
function M.on_suggestion_grew(_, params, ctx)
  local client = M.enabled and vim.lsp.get_client_by_id(ctx.client_id)
  if not client then
    return
  end
  local bufnr, row, col = growth_target(client, params)
  if not bufnr then
    return
  end
  local kind = M.inline_kind()
  if kind == 'native' then
    refresh_native(bufnr)
  elseif kind == 'plugin' then
    -- The text is what a re-request would answer: shown without asking.
    require('phi_lsp.ghost').grow(bufnr, row, col, params.text)
  end
end

--- Where a native item (plain text with a range) goes now: {row, start_col, end_col, col, rest}
--- (byte columns; col is the cursor's, rest the part of the suggestion after it) when it still
--- fits the text at the cursor, nil when it does not. It fits when the cursor is on the row of the
--- item's range, at or after its start, and what lies between the start and the cursor (typed
--- since the request) begins the suggestion. It then replaces from its start to the later of its
--- end and the cursor, so typed characters are not repeated.
---@return { row: integer, start_col: integer, end_col: integer, col: integer, rest: string }?
local function native_fit(bufnr, item)
  local start, stop = item.range.start, item.range.end_
  local win = vim.fn.bufwinid(bufnr)
  if win == -1 then
    return nil
  end
  local cursor = vim.api.nvim_win_get_cursor(win)
  local row, col = cursor[1] - 1, cursor[2]
  if start.row ~= row or stop.row ~= row or start.col > col then
    return nil
  end
  local typed = vim.api.nvim_buf_get_text(bufnr, row, start.col, row, col, {})[1] or ''
  if item.insert_text:sub(1, #typed) ~= typed then
    return nil
  end
  return {
    row = row,
    start_col = start.col,
    end_col = math.max(stop.col, col),
    col = col,
    rest = item.insert_text:sub(#typed + 1),
  }
end

--- The part of `rest` (what of the suggestion is not in the buffer yet) that accepting its next
--- `part` takes: 'word', the blanks and line breaks before the next word and that word (letters,
--- digits, `_`, any non-ASCII character), or else the next run of other characters; 'line', the
--- rest of the current line, or, when `rest` starts with a line break, that and the next line.
--- All of `rest` when nothing smaller is left.
---@param rest string
---@param part 'word'|'line'
---@return string
function M.next_part(rest, part)
  local piece
  if part == 'word' then
    piece = rest:match('^%s*[%w_\128-\255]+') or rest:match('^%s*[^%w_%s\128-\255]+')
  else
    piece = rest:match('^\n?[^\n]*')
  end
  if piece == nil or piece == '' then
    return rest
  end
  return piece
end

--- Inserts `text` at (row, col) of the window's buffer and puts the cursor after it.
local function insert_at(bufnr, row, col, text)
  local lines = vim.split(text, '\n', { plain = true })
  vim.api.nvim_buf_set_text(bufnr, row, col, row, col, lines)
  local win = vim.fn.bufwinid(bufnr)
  local last_row, last_col = row + #lines - 1, (#lines == 1 and col or 0) + #lines[#lines]
  if win ~= -1 then
    vim.api.nvim_win_set_cursor(win, { last_row + 1, last_col })
  end
  return last_row, last_col
end
M._insert_at = insert_at

--- Whether `item` is a plain-text item with a range, the kind native_fit can place.
local function placeable(item)
  local range = type(item) == 'table' and item.range
  return type(item) == 'table'
    and type(item.insert_text) == 'string'
    and type(range) == 'table'
    and type(range.start) == 'table'
    and type(range.end_) == 'table'
end

--- 0.12 shows its current item again at every cursor move in insert mode, until the answer to its
--- next request comes, also where it no longer fits: after a key that disagrees with it, and after
--- <BS> back before the place an item was answered for, where drawing it fails ("Invalid 'col': out
--- of range", an error on every key). The buffer's completor then hides such an item instead;
--- accepting it is refused anyway (accept_native).
function M._guard_native(bufnr)
  local completor = native_completor(bufnr)
  if not completor or rawget(completor, '_phi_lsp_show') or type(completor.show) ~= 'function' then
    return
  end
  -- After an explicit request made to cycle (M.cycle), its answer is shown moved by that much.
  local handler = completor.handler
  completor.handler = function(self, err, result, ctx)
    handler(self, err, result, ctx)
    local after = rawget(self, '_phi_lsp_cycle')
    if after and vim.api.nvim_buf_get_changedtick(self.bufnr) ~= after.tick then
      self._phi_lsp_cycle = nil
    elseif after and self.current and self:count_items() > 1 then
      self._phi_lsp_cycle = nil
      vim.lsp.inline_completion.select({ bufnr = self.bufnr, count = after.delta })
    end
  end
  local show = completor.show
  completor._phi_lsp_show = show
  completor.show = function(self, ...)
    local item = self.current
    if placeable(item) and not native_fit(self.bufnr, item) then
      self:hide()
      return
    end
    return show(self, ...)
  end
end

--- Accepts 0.12's native item, but only where it still fits the text at the cursor (native_fit):
--- after a keystroke that does not match it, Neovim keeps the old item until the new answer
--- comes, and would insert it at the old place. Such an item is dropped and asked for again (the
--- key is still taken: the user meant to accept). Snippets and items without a range go to
--- Neovim (whole only). With `part` ('word' or 'line') only the next part of it goes in at the
--- cursor (M.next_part) and the rest stays shown, as an item at the new cursor, until the answer to
--- Neovim's next request (typing through, from the server's cache) replaces it.
local function accept_native(bufnr, part)
  local completor = native_completor(bufnr)
  local item = completor and completor.current
  if not placeable(item) then
    if part then
      return false
    end
    return vim.lsp.inline_completion.get({ bufnr = bufnr })
  end
  -- Scheduled: an <expr> mapping may not change the text.
  vim.schedule(function()
    if completor.current ~= item or not vim.api.nvim_buf_is_valid(bufnr) then
      return
    end
    local fit = native_fit(bufnr, item)
    completor:abort()
    if not fit then
      completor:request(vim.lsp.protocol.InlineCompletionTriggerKind.Automatic)
      return
    end
    local piece = part and M.next_part(fit.rest, part) or fit.rest
    if piece ~= fit.rest then
      local row, col = insert_at(bufnr, fit.row, fit.col, piece)
      local ok, here = pcall(vim.range, row, col, row, col, { buf = bufnr })
      if ok then
        completor.current = vim.tbl_extend('force', item, { insert_text = fit.rest:sub(#piece + 1), range = here })
        completor:show()
      end
      return
    end
    local lines = vim.split(item.insert_text, '\n', { plain = true })
    vim.api.nvim_buf_set_text(bufnr, fit.row, fit.start_col, fit.row, fit.end_col, lines)
    local win = vim.fn.bufwinid(bufnr)
    if win ~= -1 then
      local last_col = (#lines == 1 and fit.start_col or 0) + #lines[#lines]
      vim.api.nvim_win_set_cursor(win, { fit.row + #lines, last_col })
    end
    if item.command then
      local client = vim.lsp.get_client_by_id(item.client_id)
      if client then
        call(client, 'exec_cmd', item.command, { bufnr = bufnr })
      end
    end
  end)
  return true
end

--- Accepts the ghost text shown in a buffer, or with `part` ('word' or 'line') its next word or
--- line (the rest stays shown); false when there is none.
---@param bufnr? integer
---@param part? 'word'|'line'
function M.accept(bufnr, part)
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  if not M.enabled then
    return false
  end
  if M.inline_kind() == 'native' then
    return accept_native(bufnr, part)
  end
  return require('phi_lsp.ghost').accept(bufnr, part)
end

function M.accept_word(bufnr)
  return M.accept(bufnr, 'word')
end

function M.accept_line(bufnr)
  return M.accept(bufnr, 'line')
end

--- Asks for a suggestion at the cursor now, as the user's explicit request (triggerKind Invoked),
--- which the server answers also when automatic suggestions are off.
function M.trigger(bufnr)
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  if not M.enabled then
    return false
  end
  local kind = M.inline_kind()
  if kind == 'native' then
    local completor = native_completor(bufnr)
    if not (completor and type(completor.request) == 'function') then
      return false
    end
    completor:abort()
    completor:request(vim.lsp.protocol.InlineCompletionTriggerKind.Invoked)
    return true
  elseif kind == 'plugin' then
    return require('phi_lsp.ghost').trigger(bufnr)
  end
  return false
end

--- Shows the next (`delta` 1) or previous (-1) of the suggestions the server offered at the
--- cursor, wrapping around. Over a suggestion that came alone (an automatic request's), or with
--- none shown, it asks explicitly (triggerKind Invoked), which the server answers with up to
--- settings.alternatives of them, the same greedy one first; the shown one then moves by `delta`.
--- 0.12's native ghost text cycles with vim.lsp.inline_completion.select(), which also shows
--- "(2/3)" after it; the plugin's own does the same. False when there is nothing to ask.
---@param bufnr? integer
---@param delta integer
function M.cycle(bufnr, delta)
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  if not M.enabled then
    return false
  end
  local kind = M.inline_kind()
  if kind == 'native' then
    local completor = native_completor(bufnr)
    if not (completor and type(completor.request) == 'function') then
      return false
    end
    M._guard_native(bufnr)
    if completor.current and completor:count_items() > 1 then
      vim.lsp.inline_completion.select({ bufnr = bufnr, count = delta })
      return true
    end
    if completor.current then
      completor._phi_lsp_cycle = { delta = delta, tick = vim.api.nvim_buf_get_changedtick(bufnr) }
    end
    completor:request(vim.lsp.protocol.InlineCompletionTriggerKind.Invoked)
    return true
  elseif kind == 'plugin' then
    return require('phi_lsp.ghost').cycle(bufnr, delta)
  end
  return false
end

function M.next(bufnr)
  return M.cycle(bufnr, 1)
end

function M.prev(bufnr)
  return M.cycle(bufnr, -1)
end

--- The phi-lsp settings a client runs with (however they were configured), or nil.
local function client_settings(client)
  local settings = type(client.settings) == 'table' and client.settings['phi-lsp']
  return type(settings) == 'table' and settings or nil
end

--- Whether the server suggests as you type (settings.automatic, on unless set false).
function M.automatic()
  local client = M.clients()[1]
  local settings = client and client_settings(client)
  if settings and settings.automatic ~= nil then
    return settings.automatic ~= false
  end
  return (M.config.settings or {}).automatic ~= false
end

--- Automatic suggestions on or off (manual-only: the trigger key asks), told to the running
--- servers at once; their other settings stay as they are.
function M.set_automatic(on)
  M.config.settings = vim.tbl_extend('force', M.config.settings or {}, { automatic = on })
  for _, client in ipairs(M.clients()) do
    local settings = vim.tbl_extend('force', client_settings(client) or {}, { automatic = on })
    client.settings = vim.tbl_extend('force', client.settings or {}, { ['phi-lsp'] = settings })
    call(client, 'notify', 'workspace/didChangeConfiguration', { settings = client.settings })
  end
  M._statusline.at = nil -- refreshed at the next redraw
end

--- Turns suggestions on or off in every buffer.
function M.set_enabled(on)
  M.enabled = on
  if M.inline_kind() == 'native' then
    for _, client in ipairs(M.clients()) do
      for bufnr in pairs(client.attached_buffers) do
        vim.lsp.inline_completion.enable(on, { bufnr = bufnr })
      end
    end
  elseif not on then
    require('phi_lsp.ghost').clear_all()
  end
end

--- The server's `phi-lsp/status` (state, model, device, dtype, last timings), or nil and an error.
---@return table?, string?
function M.status(client, timeout_ms)
  client = client or M.clients()[1]
  if not client then
    return nil, 'no phi_lsp client is running: open a Python file'
  end
  -- No params (the server takes `{}` and `null` too).
  local response, err = call(client, 'request_sync', 'phi-lsp/status', nil, timeout_ms or 2000, 0)
  if not response then
    return nil, 'phi-lsp/status: ' .. tostring(err)
  end
  if response.err then
    return nil, 'phi-lsp/status: ' .. (response.err.message or vim.inspect(response.err))
  end
  return response.result
end

--- Milliseconds as a whole number ('<1' for an answer under a millisecond, '?' for none).
local function whole_ms(ms)
  if type(ms) ~= 'number' then
    return '?'
  end
  if ms > 0 and ms < 1 then
    return '<1'
  end
  return tostring(math.floor(ms + 0.5))
end

--- What served an answer without the model, by the status's `last.stop`.
local served_by = {
  ['typed-through'] = 'from the cache: typed through the suggestion shown',
  speculated = 'from the speculation',
  ['running-generation'] = 'from the generation still running',
}

--- The status's `last.stop` when a request brought no suggestion.
local no_suggestion = { ['not-ready'] = true, ['no-prompt'] = true, empty = true, cancelled = true, failed = true }

--- The last suggestion's figures: its latency and where the answer came from.
local function describe_last(last)
  local ms = whole_ms(last.total_ms)
  local source = served_by[last.stop] or (last.from_cache == true and 'from the cache' or nil)
  if source then
    return ('last suggestion %s ms (%s)'):format(ms, source)
  end
  local tail = ''
  if last.stop == 'growing' then
    tail = ', still growing'
  elseif no_suggestion[last.stop] then
    tail = ', no suggestion: ' .. last.stop
  end
  return ('last suggestion %s ms (%s prompt tokens, %s reused, %s generated%s)'):format(
    ms,
    last.prompt_tokens or '?',
    last.reused_tokens or '?',
    last.generated_tokens or '?',
    tail
  )
end

--- One line about the server's state.
function M.describe(status)
  local line = ('%s: %s on %s, %s'):format(
    status.state,
    status.model or '?',
    status.device or '?',
    status.dtype or '?'
  )
  if status.state ~= 'ready' and status.message then
    line = line .. ' — ' .. status.message
  end
  if status.automatic == false then
    line = line .. ' (manual-only: ' .. (M.config.trigger_key or 'require("phi_lsp").trigger()') .. ' asks)'
  end
  local last = status.last
  if type(last) == 'table' then
    line = line .. '; ' .. describe_last(last)
  end
  return line
end

--- The statusline component's cache: the text, when it was asked for, and whether an answer is
--- awaited.
M._statusline = { text = '', latency = nil, at = nil, pending = false }

--- A short line about the server for a statusline: its state, the dtype and the last suggestion's
--- latency, e.g. "phi ready q8_0 42ms", "phi loading", "phi off", "phi manual ...". Cheap: it
--- returns what it has and, at most every `status_refresh_ms`, asks the server's phi-lsp/status
--- without waiting (the statusline is redrawn when the answer changes it). "" with no server.
---@return string
function M.statusline()
  local cache = M._statusline
  local client = M.clients()[1]
  if not client then
    return ''
  end
  local now = vim.uv.now()
  local every = M.config.status_refresh_ms or 1000
  if not cache.pending and (cache.at == nil or now - cache.at >= every) then
    cache.pending = true
    cache.at = now
    local ok, sent = pcall(call, client, 'request', 'phi-lsp/status', nil, function(err, status)
      cache.pending = false
      if err or type(status) ~= 'table' then
        return
      end
      local text = M.describe_short(status)
      if text ~= cache.text then
        cache.text = text
        vim.schedule(function()
          pcall(vim.cmd.redrawstatus)
        end)
      end
    end)
    if not (ok and sent) then
      cache.pending = false
    end
  end
  if not M.enabled then
    return 'phi off'
  end
  return cache.text
end

--- The statusline's text for a phi-lsp/status answer. The latency is the last one that concerned
--- a suggestion: an automatic request answered empty in manual-only mode keeps the one before.
function M.describe_short(status)
  local cache = M._statusline
  local parts = { 'phi', tostring(status.state or '?') }
  if status.automatic == false then
    parts[#parts + 1] = 'manual'
  end
  if status.state == 'ready' then
    parts[#parts + 1] = tostring(status.dtype or '?')
    local last = status.last
    if type(last) == 'table' and last.stop ~= 'manual' and type(last.total_ms) == 'number' then
      cache.latency = whole_ms(last.total_ms) .. 'ms'
    end
    if cache.latency then
      parts[#parts + 1] = cache.latency
    end
  end
  return table.concat(parts, ' ')
end

function M.restart()
  local clients = M.clients()
  local buffers = {}
  for _, client in ipairs(clients) do
    for bufnr in pairs(client.attached_buffers) do
      buffers[#buffers + 1] = bufnr
    end
    call(client, 'stop')
  end
  -- Start again once the old processes are gone.
  vim.defer_fn(function()
    if has_011 and vim.lsp.is_enabled and vim.lsp.is_enabled('phi_lsp') then
      vim.lsp.enable('phi_lsp')
    end
    for _, bufnr in ipairs(buffers) do
      if vim.api.nvim_buf_is_valid(bufnr) and #M.clients(bufnr) == 0 then
        M.start(bufnr)
      end
    end
  end, 500)
end

--- :PhiLsp {subcommand}
function M.command(name)
  if name == 'status' then
    local status, err = M.status()
    if status then
      vim.notify('phi-lsp ' .. M.describe(status) .. (M.enabled and '' or ' (suggestions off)'))
    else
      vim.notify(err, vim.log.levels.WARN)
    end
  elseif name == 'restart' then
    M.restart()
  elseif name == 'enable' or name == 'disable' or name == 'toggle' then
    local on = name == 'enable' or (name == 'toggle' and not M.enabled)
    M.set_enabled(on)
    vim.notify('phi-lsp: suggestions ' .. (on and 'on' or 'off'))
  elseif name == 'automatic' then
    local on = not M.automatic()
    M.set_automatic(on)
    local key = M.config.trigger_key
    vim.notify(
      'phi-lsp: automatic suggestions ' .. (on and 'on' or ('off (ask with ' .. (key or 'require("phi_lsp").trigger()') .. ')'))
    )
  elseif name == 'log' then
    vim.cmd.tabedit(vim.lsp.get_log_path())
  else
    vim.notify(
      'phi-lsp: unknown subcommand ' .. name .. ' (status, restart, enable, disable, toggle, automatic, log)',
      vim.log.levels.ERROR
    )
  end
end

return M
