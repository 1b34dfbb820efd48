-- Progressive suggestions in real Neovim: the ghost text grows while the server generates. Run:
--   nvim --headless --clean -l tests/editors/nvim/test_growth.lua PHI_LSP_BIN MODEL_DIR [auto|native|plugin]
-- Like test_nvim.lua it drives a second Neovim (`--embed --headless`) over RPC. The server runs
-- with PHI_LSP_TEST_TOKEN_DELAY_MS (tests/editors/growing.json), so that one generation lasts long
-- enough to watch. We type a function whose suggestion has several lines, read the ghost text
-- every few milliseconds during that one generation, and check that it grows (each reading longer
-- than the one before and starting with it), that phi-lsp/suggestionGrew reached the plugin and
-- ended with done, and that the last reading is what `phi-lsp complete` prints there; then <Tab>
-- accepts the whole suggestion.

local repo = vim.fn.fnamemodify(debug.getinfo(1, 'S').source:sub(2), ':p:h:h:h:h')
local usage = 'usage: test_growth.lua PHI_LSP_BIN MODEL_DIR [auto|native|plugin]'
local bin = vim.fn.fnamemodify(assert(arg[1], usage), ':p')
local model = vim.fn.fnamemodify(assert(arg[2], usage), ':p'):gsub('/$', '')
local mode = arg[3] or 'auto'
local plugin_dir = repo .. '/editors/nvim'
local label = ('nvim %s growth/%s'):format(tostring(vim.version()), mode)
local growing = vim.json.decode(table.concat(vim.fn.readfile(repo .. '/tests/editors/growing.json'), '\n'))
local typed = growing.text

local passed, failed = 0, 0
local function say(line)
  io.stdout:write(line, '\n')
end
local function check(ok, what, detail)
  if ok then
    passed = passed + 1
    say(('ok - %s: %s'):format(label, what))
  else
    failed = failed + 1
    say(('not ok - %s: %s%s'):format(label, what, detail and ('\n    ' .. detail:gsub('\n', '\n    ')) or ''))
  end
  return ok
end

local tmp = vim.fn.tempname()
vim.fn.mkdir(tmp, 'p')
local file = tmp .. '/growing.py'
vim.fn.writefile({}, file)

-- The expected value first, from the one-shot CLI with the same settings and no delay.
vim.fn.writefile(vim.split(typed, '\n'), tmp .. '/expected.py')
local typed_lines = vim.split(typed, '\n')
local line, character = #typed_lines - 1, #typed_lines[#typed_lines] -- ASCII: bytes are UTF-16 units
local cli = vim
  .system({ bin, 'complete', tmp .. '/expected.py', '--model', model, '--line', tostring(line), '--character',
    tostring(character), '--max-new-tokens', tostring(growing.maxNewTokens), '--deadline-ms', '60000', '--json' },
    { text = true })
  :wait(120000)
local expected = cli.code == 0 and vim.json.decode(cli.stdout).text or nil
local function finish_early()
  say(('%s: %d passed, %d failed'):format(label, passed, failed))
  os.exit(failed == 0 and 0 or 1)
end
if not check(expected and expected ~= '', 'phi-lsp complete gives a suggestion there',
    ('exit %s\n%s%s'):format(cli.code, cli.stdout, cli.stderr)) then
  finish_early()
end
-- Growth is per line: a suggestion of one line has nothing to grow.
if not check(expected:find('\n') ~= nil, 'the suggestion there has several lines (growing.json fits the model)',
    ('%q'):format(expected)) then
  finish_early()
end

local child = vim.fn.jobstart({ vim.v.progpath, '--embed', '--headless', '--clean', '-n', '-i', 'NONE' }, {
  rpc = true,
  env = {
    XDG_STATE_HOME = tmp .. '/state',
    XDG_CONFIG_HOME = tmp .. '/config',
    XDG_DATA_HOME = tmp .. '/data',
    PHI_LSP_TEST_TOKEN_DELAY_MS = tostring(growing.tokenDelayMs),
  },
})
assert(child > 0, 'could not start ' .. vim.v.progpath)

local function lua(code, ...)
  return vim.rpcrequest(child, 'nvim_exec_lua', code, { ... })
end

local function wait_for(timeout_ms, fn, interval)
  local value
  local ok = vim.wait(timeout_ms, function()
    value = fn()
    return value ~= nil and value ~= false and value ~= vim.NIL
  end, interval or 50)
  return ok and value or nil
end

local function finish()
  pcall(vim.rpcrequest, child, 'nvim_command', 'qall!')
  vim.fn.jobwait({ child }, 5000)
  pcall(vim.fn.jobstop, child)
  finish_early()
end

lua([[
  local plugin_dir, bin, model, mode, max_new_tokens = ...
  vim.opt.runtimepath:prepend(plugin_dir)
  vim.cmd.runtime('plugin/phi_lsp.lua')
  require('phi_lsp').setup({
    cmd = { bin, '--stdio' },
    -- No speculation: the only generation after typing is the one watched.
    settings = { model = model, maxNewTokens = max_new_tokens, deadlineMs = 60000, speculate = false, progressive = true },
    inline = mode,
  })
  -- Every phi-lsp/suggestionGrew the plugin receives, in order (the handler is looked up per call).
  _G.grew = {}
  local phi = require('phi_lsp')
  local handler = phi.on_suggestion_grew
  phi.on_suggestion_grew = function(err, params, ctx)
    _G.grew[#_G.grew + 1] = { text = params.text, done = params.done, version = params.textDocument.version,
      line = params.position.line, character = params.position.character }
    return handler(err, params, ctx)
  end
]], plugin_dir, bin, model, mode, growing.maxNewTokens)

local kind = lua([[return require('phi_lsp').inline_kind()]])
label = ('%s (%s ghost text)'):format(label, kind)
lua('vim.cmd.edit(...)', file)
local attached = wait_for(20000, function()
  return lua([[
    local c = require('phi_lsp').clients(0)[1]
    return c and c.initialized and c.id or nil
  ]])
end)
if not check(attached ~= nil, 'phi_lsp attaches to a Python buffer') then
  finish()
end
local status = wait_for(60000, function()
  return lua([[
    local s = require('phi_lsp').status(nil, 2000)
    return s and s.state ~= 'loading' and s or nil
  ]])
end)
if not check(status and status.state == 'ready', 'the model is ready', vim.inspect(status)) then
  finish()
end

lua('vim.bo.autoindent = false; vim.bo.indentexpr = ""; vim.bo.smartindent = false')
vim.rpcrequest(child, 'nvim_input', 'i' .. typed:gsub('\n', '<CR>'))
local function buffer_text()
  return lua([[return table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), '\n')]])
end
check(wait_for(5000, function()
  return buffer_text() == typed or nil
end) ~= nil, 'the keys reach the buffer', buffer_text())

local ghost_reader = [=[
  local kind = ...
  local ns = vim.api.nvim_get_namespaces()[kind == 'native' and 'nvim.lsp.inline_completion' or 'phi_lsp.ghost']
  local marks = ns and vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true }) or {}
  local where = { tick = vim.api.nvim_buf_get_changedtick(0), cursor = vim.api.nvim_win_get_cursor(0) }
  if #marks == 0 then return where end
  local details = marks[1][4]
  local first = ''
  for _, chunk in ipairs(details.virt_text or {}) do
    first = first .. chunk[1]
  end
  local lines = { first }
  for _, virt_line in ipairs(details.virt_lines or {}) do
    local text = ''
    for _, chunk in ipairs(virt_line) do
      text = text .. chunk[1]
    end
    lines[#lines + 1] = text
  end
  where.text = table.concat(lines, '\n')
  return where
]=]

-- Read the ghost text every 10 ms until it is the whole suggestion (or a minute passes), keeping
-- each new reading; the buffer and the cursor must not change meanwhile (one generation, one place).
local readings, places = {}, {}
wait_for(60000, function()
  local now = lua(ghost_reader, kind)
  places[now.tick .. ':' .. now.cursor[1] .. ':' .. now.cursor[2]] = true
  if now.text and now.text ~= readings[#readings] then
    readings[#readings + 1] = now.text
  end
  return now.text == expected
end, 10)
local described = {}
for i, reading in ipairs(readings) do
  described[#described + 1] = ('%d: %q'):format(i, reading)
end
described = table.concat(described, '\n')

check(vim.tbl_count(places) == 1, 'the buffer and the cursor stay as typed while the ghost text is read',
  vim.inspect(places))
check(#readings >= 2, 'the ghost text is read at least twice during the generation, and differs', described)
local grows = #readings >= 2
for i = 2, #readings do
  local before, after = readings[i - 1], readings[i]
  grows = grows and #after > #before and after:sub(1, #before) == before
end
check(grows, 'each reading is longer than the one before and starts with it', described)
check(readings[#readings] == expected, 'the last reading is what `phi-lsp complete` prints',
  ('last:     %q\nexpected: %q'):format(readings[#readings] or '', expected))

-- What reached the plugin: growths of this place, in order, the last one done and whole.
local grew = wait_for(10000, function()
  local all = lua('return _G.grew')
  return #all > 0 and all[#all].done and all or nil
end) or lua('return _G.grew')
local texts = {}
for i, g in ipairs(grew) do
  texts[#texts + 1] = ('%d: done=%s line=%s character=%s %q'):format(i, g.done, g.line, g.character, g.text)
end
texts = table.concat(texts, '\n')
local last = grew[#grew]
check(last and last.done and last.text == expected,
  'phi-lsp/suggestionGrew reached the plugin, the last one done with the whole suggestion', texts)
local here = #grew > 0
for _, g in ipairs(grew) do
  here = here and g.line == line and g.character == character
end
check(here, 'every notification names the place typed to', texts)

-- <Tab> takes the whole grown suggestion.
vim.rpcrequest(child, 'nvim_input', '<Tab>')
local want = typed .. expected
check(wait_for(5000, function()
  return buffer_text() == want or nil
end) ~= nil, '<Tab> accepts the whole grown suggestion', ('buffer: %q\nwant:   %q'):format(buffer_text(), want))

finish()
