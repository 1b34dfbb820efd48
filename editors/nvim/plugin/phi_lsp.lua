-- phi-lsp: Phi-1 completions for Python. Starts the server on Python buffers (unless
-- `vim.g.phi_lsp_autostart = false`) and defines :PhiLsp; everything else loads on first use.
if vim.g.loaded_phi_lsp or vim.fn.has('nvim-0.10') == 0 then
  return
end
vim.g.loaded_phi_lsp = true

vim.api.nvim_create_user_command('PhiLsp', function(args)
  require('phi_lsp').command(args.fargs[1] or 'status')
end, {
  nargs = '?',
  complete = function()
    return { 'status', 'restart', 'enable', 'disable', 'toggle', 'automatic', 'log' }
  end,
  desc = 'phi-lsp: status, restart, enable, disable, toggle, automatic, log',
})

vim.api.nvim_create_autocmd('LspAttach', {
  group = vim.api.nvim_create_augroup('phi_lsp.attach', {}),
  callback = function(args)
    local client = vim.lsp.get_client_by_id(args.data.client_id)
    if client and client.name == 'phi_lsp' then
      require('phi_lsp').on_attach(client, args.buf)
    end
  end,
})

if vim.g.phi_lsp_autostart ~= false then
  if vim.fn.has('nvim-0.11') == 1 then
    vim.lsp.enable('phi_lsp') -- the config is lsp/phi_lsp.lua
  else
    vim.api.nvim_create_autocmd('FileType', {
      group = vim.api.nvim_create_augroup('phi_lsp.autostart', {}),
      pattern = 'python',
      callback = function(args)
        require('phi_lsp').start(args.buf)
      end,
    })
  end
end
